//! cuBLASLt matmuls on row-major tensors: bf16 or f32 inputs, f32 accumulation, bias
//! epilogue. cudarc's safe wrapper ties C's type to A's; training needs bf16 inputs with
//! f32 weight gradients, so this calls the `result` layer directly. Each shape's layouts,
//! descriptor and heuristic choice are made once and kept (issue 18: they were rebuilt,
//! and the heuristic asked, on every call).

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Arc;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};

use crate::error::{Error, Result};
use crate::tensor::DType;

fn blas_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("cuBLASLt {what}: {e:?}"))
}

fn data_type(d: DType) -> Result<sys::cudaDataType> {
    match d {
        DType::F32 => Ok(sys::cudaDataType_t::CUDA_R_32F),
        DType::BF16 => Ok(sys::cudaDataType_t::CUDA_R_16BF),
        DType::U32 => Err(Error::Cuda(
            "cuBLASLt: u32 matrices are not supported".into(),
        )),
    }
}

/// A cuBLASLt handle with its workspace, bound to one stream, and the plans of the shapes
/// it has run.
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: HashMap<PlanKey, Plan>,
}

/// Plans kept at most; past that the cache starts again (training with ragged batches meets
/// a new row count per batch, so the shapes do not settle).
const MAX_PLANS: usize = 1024;

/// What a matmul's descriptors and chosen algorithm depend on: everything but the
/// pointers' values (their alignments are in, as the heuristic is told them).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    in_type: DType,
    out_type: DType,
    bias: bool,
    gelu: bool,
    /// Alignment in bytes (up to 256) of cuBLASLt's A (our B), B (our A) and C.
    align: [u32; 3],
}

/// The layouts, descriptor and algorithm of one shape, built once: creating them and asking
/// the heuristic cost more host time than enqueuing a small product.
struct Plan {
    la: Layout,
    lb: Layout,
    lc: Layout,
    desc: Desc,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// The alignment cuBLASLt is told for a pointer: its power of two, at most 256 bytes.
fn alignment(p: u64) -> u32 {
    1u32 << p.trailing_zeros().min(8)
}

// SAFETY: the handle is used only through &self methods that enqueue on `stream`; cuBLASLt
// handles may be shared across threads when calls are not concurrent on one stream, and
// the backend serialises launches on its single stream.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by create_handle and not destroyed elsewhere.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// One row-major matmul `C[m,n] = op(A) · op(B) (+ bias[n])` described by raw pointers.
pub struct MatmulArgs {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// A's device pointer (`[m,k]`, or `[k,m]` with `trans_a`).
    pub a: u64,
    /// Whether A is stored transposed.
    pub trans_a: bool,
    /// B's device pointer (`[k,n]`, or `[n,k]` with `trans_b`).
    pub b: u64,
    /// Whether B is stored transposed.
    pub trans_b: bool,
    /// C's device pointer.
    pub c: u64,
    /// Element type of A and B.
    pub in_type: DType,
    /// Element type of C (and of the bias).
    pub out_type: DType,
    /// Optional bias pointer, `[n]` of `out_type`.
    pub bias: Option<u64>,
    /// Apply cuBLASLt's GELU epilogue after the bias (its tanh approximation of GELU).
    pub gelu: bool,
}

/// RAII wrappers so every early return frees the descriptors.
struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}

fn layout(t: sys::cudaDataType, rows: usize, cols: usize, ld: usize) -> Result<Layout> {
    result::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)
        .map(Layout)
        .map_err(|e| blas_err("matrix layout", e))
}

/// Sets one descriptor attribute from a plain value.
unsafe fn set_attr<V>(desc: &Desc, attr: sys::cublasLtMatmulDescAttributes_t, v: &V) -> Result<()> {
    result::set_matmul_desc_attribute(desc.0, attr, v as *const V as *const c_void, size_of::<V>())
        .map_err(|e| blas_err("descriptor attribute", e))
}

impl Blas {
    /// Creates the handle and a workspace (32 MiB on Hopper, 4 MiB before, as NVIDIA advises).
    pub fn new(stream: Arc<CudaStream>, compute_major: i32) -> Result<Self> {
        let handle = result::create_handle().map_err(|e| blas_err("create handle", e))?;
        let size = if compute_major >= 9 {
            32 << 20
        } else {
            4 << 20
        };
        // SAFETY: the workspace is scratch memory; its contents are never read by us.
        let workspace = unsafe { stream.alloc::<u8>(size) }
            .map_err(|e| Error::Cuda(format!("workspace alloc: {e:?}")))?;
        Ok(Blas {
            handle,
            workspace,
            stream,
            plans: HashMap::new(),
        })
    }

    /// Enqueues the matmul on the stream, with the shape's plan (made on first use).
    ///
    /// # Safety
    /// The pointers must address live device buffers of the sizes `args` describes.
    pub unsafe fn matmul(&mut self, args: &MatmulArgs) -> Result<()> {
        let key = PlanKey {
            m: args.m,
            n: args.n,
            k: args.k,
            trans_a: args.trans_a,
            trans_b: args.trans_b,
            in_type: args.in_type,
            out_type: args.out_type,
            bias: args.bias.is_some(),
            gelu: args.gelu,
            align: [alignment(args.b), alignment(args.a), alignment(args.c)],
        };
        if !self.plans.contains_key(&key) {
            if self.plans.len() >= MAX_PLANS {
                self.plans.clear();
            }
            let plan = self.plan(&key)?;
            self.plans.insert(key, plan);
        }
        let plan = &self.plans[&key];
        use sys::cublasLtMatmulDescAttributes_t as A;
        if let Some(bias) = args.bias {
            // The one pointer the descriptor holds: set for every call (cuBLASLt reads the
            // descriptor while enqueuing, so the next call may change it).
            set_attr(&plan.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ws_size = self.workspace.len();
        let (ws, _sync) = self.workspace.device_ptr_mut(&self.stream);
        result::matmul(
            self.handle,
            plan.desc.0,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            args.b as *const c_void,
            plan.la.0,
            args.a as *const c_void,
            plan.lb.0,
            args.c as *const c_void,
            plan.lc.0,
            args.c as *mut c_void,
            plan.lc.0,
            &plan.algo,
            ws as *mut c_void,
            ws_size,
            self.stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(|e| blas_err("matmul", e))
    }

    /// Builds the layouts and descriptor of a shape and asks the heuristic for its fastest
    /// algorithm.
    fn plan(&self, key: &PlanKey) -> Result<Plan> {
        let PlanKey {
            m,
            n,
            k,
            trans_a,
            trans_b,
            ..
        } = *key;
        let in_t = data_type(key.in_type)?;
        let out_t = data_type(key.out_type)?;
        // Row-major C[m,n] is column-major Cᵀ[n,m] = op(B)ᵀ · op(A)ᵀ: hand cuBLASLt B as its
        // first operand and A as its second, with the same transpose flags.
        let la = if trans_b {
            layout(in_t, k, n, k)?
        } else {
            layout(in_t, n, k, n)?
        };
        let lb = if trans_a {
            layout(in_t, m, k, m)?
        } else {
            layout(in_t, k, m, k)?
        };
        let lc = layout(out_t, n, m, n)?;
        let desc = Desc(
            result::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(|e| blas_err("matmul descriptor", e))?,
        );
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY (all set_attr calls): each value has the attribute's documented type.
        unsafe {
            set_attr(&desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &(trans_b as i32))?;
            set_attr(&desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &(trans_a as i32))?;
        }
        use sys::cublasLtEpilogue_t as E;
        let epilogue = match (key.bias, key.gelu) {
            (true, true) => Some(E::CUBLASLT_EPILOGUE_GELU_BIAS),
            (true, false) => Some(E::CUBLASLT_EPILOGUE_BIAS),
            (false, true) => Some(E::CUBLASLT_EPILOGUE_GELU),
            (false, false) => None,
        };
        if let Some(e) = epilogue {
            unsafe { set_attr(&desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &e)? };
        }
        if key.bias {
            unsafe { set_attr(&desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out_t)? };
        }
        let pref = Pref(result::create_matmul_pref().map_err(|e| blas_err("preference", e))?);
        let ws_size = self.workspace.len();
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let set_pref = |attr: P, v: *const c_void, size: usize| {
            // SAFETY: `v` points to a live value of `size` bytes of the attribute's type.
            unsafe { result::set_matmul_pref_attribute(pref.0, attr, v, size) }
                .map_err(|e| blas_err("preference attribute", e))
        };
        set_pref(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws_size as *const usize as *const c_void,
            size_of::<usize>(),
        )?;
        // cuBLASLt assumes 256-byte aligned operands unless told otherwise; a pointer into
        // the middle of a tensor (max-sim's passage chunks) may be less aligned. Its A is
        // our B (see the layouts above).
        let [align_a, align_b, align_c] = key.align;
        for (attr, a) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c),
        ] {
            set_pref(attr, &a as *const u32 as *const c_void, size_of::<u32>())?;
        }
        // SAFETY: every descriptor was created above and lives until the call returns.
        let heuristic = unsafe {
            result::get_matmul_algo_heuristic(self.handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0)
        }
        .map_err(|e| {
            blas_err(
                &format!(
                    "no algorithm for m={m} n={n} k={k} {}->{}",
                    key.in_type, key.out_type
                ),
                e,
            )
        })?;
        Ok(Plan {
            la,
            lb,
            lc,
            desc,
            algo: heuristic.algo,
        })
    }
}
