//! Device memory: allocation (poisoned on request), uploads, staged downloads, casts,
//! offset copies, the memory pool's counters and the kernel function cache.

use super::*;

/// Page-locked host buffers for large downloads, grown on demand and reused: on an H100
/// host, reading a 16k x 1024 bf16 tensor into a fresh pageable Vec and converting it on
/// one thread took about three times as long as the forward pass that made it.
#[derive(Default)]
pub(super) struct Staging {
    f32: Option<PinnedHostSlice<f32>>,
    bf16: Option<PinnedHostSlice<bf16>>,
}

/// Downloads at least this many elements go through `Staging` and a parallel conversion.
pub(super) const STAGED_DOWNLOAD: usize = 1 << 16;

/// Copies `src` into the pinned buffer in `slot` (grown to fit) and converts its first `n`
/// elements to f32 on all cores.
pub(super) fn download_staged<E>(
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

impl Cuda {
    pub(super) fn func(&self, module: &str, name: &str) -> Result<CudaFunction> {
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
    pub(super) fn alloc(&self, shape: &[usize], dtype: DType) -> Result<T> {
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
                    None,
                ),
            }
        };
        if self.poison.load(Ordering::Relaxed) {
            let (ptr, bytes) = match &mut storage {
                CudaStorage::F32(s) => (s.device_ptr_mut(&self.stream).0, n * 4),
                CudaStorage::BF16(s) => (s.device_ptr_mut(&self.stream).0, n * 2),
                CudaStorage::U32(s, _) => (s.device_ptr_mut(&self.stream).0, n * 4),
            };
            // SAFETY: ptr addresses `bytes` bytes just allocated on this stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, self.stream.cu_stream())
            }
            .map_err(|e| cuda_err("poison", e))?;
        }
        Ok(Tensor::from_parts(shape.to_vec(), dtype, storage))
    }

    /// The device's default memory pool (where cuMemAllocAsync takes tensors from).
    pub(super) fn default_pool(&self) -> Result<sys::CUmemoryPool> {
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
    pub(super) fn pool_attribute(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
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

    pub(super) fn device_ptr(&self, t: &T) -> u64 {
        match t.storage() {
            CudaStorage::F32(s) => s.device_ptr(&self.stream).0,
            CudaStorage::BF16(s) => s.device_ptr(&self.stream).0,
            CudaStorage::U32(s, _) => s.device_ptr(&self.stream).0,
        }
    }

    pub(super) fn memset_zero(&self, t: &mut T) -> Result<()> {
        let r = match t.storage_mut() {
            CudaStorage::F32(s) => self.stream.memset_zeros(s),
            CudaStorage::BF16(s) => self.stream.memset_zeros(s),
            CudaStorage::U32(s, max) => {
                *max = None;
                self.stream.memset_zeros(s)
            }
        };
        r.map_err(|e| cuda_err("memset", e))
    }

    /// Ids are validated on the host: an out-of-range id would read or write out of bounds.
    /// Ids uploaded from the host carry their largest value, so they need no download;
    /// others (or out-of-range ones, for the message naming the position) are downloaded.
    pub(super) fn check_ids_device(&self, op: &'static str, ids: &T, limit: usize) -> Result<()> {
        if let CudaStorage::U32(_, Some(max)) = ids.storage() {
            if (*max as usize) < limit {
                return Ok(());
            }
        }
        check_ids(op, &self.to_vec_u32(ids)?, limit)
    }
}

/// The default memory pool's high-water mark of used bytes (every tensor comes from
/// that pool through cuMemAllocAsync).
pub(super) fn peak_memory(be: &Cuda) -> Result<Option<u64>> {
    // Without stream-ordered allocation cudarc falls back to cuMemAlloc and the pool
    // sees nothing.
    if !be.ctx.has_async_alloc() {
        return Ok(None);
    }
    be.pool_attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        .map(Some)
}

pub(super) fn reset_peak_memory(be: &Cuda) -> Result<()> {
    let pool = be.default_pool()?;
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

pub(super) fn memory_available(be: &Cuda) -> Result<Option<u64>> {
    if !be.ctx.has_async_alloc() {
        return Ok(None);
    }
    // Queued frees first; then what the driver has free plus all the pool holds (in use
    // or kept for reuse: RESERVED includes USED).
    be.synchronize()?;
    be.ctx.bind_to_thread().map_err(|e| cuda_err("memory", e))?;
    let (free, _) = cudarc::driver::result::mem_get_info().map_err(|e| cuda_err("memory", e))?;
    let held = be.pool_attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
    Ok(Some(free as u64 + held))
}

pub(super) fn upload(be: &Cuda, data: HostData<'_>, shape: &[usize]) -> Result<T> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return shape_err(
            "upload",
            format!("{} elements do not fill shape {shape:?}", data.len()),
        );
    }
    if data.is_empty() {
        return be.zeros(shape, data.dtype());
    }
    let e = |e| cuda_err("upload", e);
    let storage = match data {
        HostData::F32(v) => CudaStorage::F32(be.stream.clone_htod(v).map_err(e)?),
        HostData::BF16(v) => CudaStorage::BF16(be.stream.clone_htod(v).map_err(e)?),
        HostData::U32(v) => {
            CudaStorage::U32(be.stream.clone_htod(v).map_err(e)?, v.iter().max().copied())
        }
    };
    Ok(Tensor::from_parts(shape.to_vec(), data.dtype(), storage))
}

pub(super) fn to_vec_f32(be: &Cuda, t: &T) -> Result<Vec<f32>> {
    count_host_sync();
    let n = t.numel();
    let e = |e| cuda_err("download", e);
    if n >= STAGED_DOWNLOAD {
        let mut staging = be.staging.lock().unwrap();
        let (ctx, stream) = (&be.ctx, &be.stream);
        return match t.storage() {
            CudaStorage::F32(s) => download_staged(ctx, stream, &mut staging.f32, s, n, |x| x),
            CudaStorage::BF16(s) => {
                download_staged(ctx, stream, &mut staging.bf16, s, n, |x| x.to_f32())
            }
            CudaStorage::U32(..) => dtype_err("to_vec_f32", "tensor is u32"),
        };
    }
    match t.storage() {
        CudaStorage::F32(s) => {
            let mut v = be.stream.clone_dtoh(s).map_err(e)?;
            v.truncate(n);
            Ok(v)
        }
        CudaStorage::BF16(s) => {
            let v = be.stream.clone_dtoh(s).map_err(e)?;
            Ok(v[..n].iter().map(|x| x.to_f32()).collect())
        }
        CudaStorage::U32(..) => dtype_err("to_vec_f32", "tensor is u32"),
    }
}

pub(super) fn to_vec_u32(be: &Cuda, t: &T) -> Result<Vec<u32>> {
    count_host_sync();
    match t.storage() {
        CudaStorage::U32(s, _) => {
            let mut v = be
                .stream
                .clone_dtoh(s)
                .map_err(|e| cuda_err("download", e))?;
            v.truncate(t.numel());
            Ok(v)
        }
        _ => dtype_err("to_vec_u32", format!("tensor is {}", t.dtype())),
    }
}

pub(super) fn cast(be: &Cuda, x: &T, dtype: DType) -> Result<T> {
    check_float("cast", "x", x)?;
    if !dtype.is_float() {
        return dtype_err("cast", "cannot cast floats to u32");
    }
    let mut y = be.alloc(x.shape(), dtype)?;
    let n = x.numel();
    if n == 0 {
        return Ok(y);
    }
    if x.dtype() == dtype {
        let e = |e| cuda_err("copy", e);
        match (x.storage(), y.storage_mut()) {
            (CudaStorage::F32(s), CudaStorage::F32(d)) => be.stream.memcpy_dtod(s, d).map_err(e)?,
            (CudaStorage::BF16(s), CudaStorage::BF16(d)) => {
                be.stream.memcpy_dtod(s, d).map_err(e)?
            }
            _ => unreachable!("same dtype, same storage variant"),
        }
        return Ok(y);
    }
    let f = be.func(
        "elementwise",
        &format!("cast_{}_{}", sfx(x.dtype()), sfx(dtype)),
    )?;
    let n = n as i64;
    launch!(be, f, grid_1d(n as usize), [x, &mut y, &n])?;
    Ok(y)
}

pub(super) fn zero_at(be: &Cuda, t: &mut T, offset: usize, len: usize) -> Result<()> {
    const OP: &str = "zero_at";
    check_dtype(OP, "arena", t, DType::F32)?;
    check_range(OP, t, &(offset..offset + len))?;
    if len == 0 {
        return Ok(());
    }
    let d = be.device_ptr(t) + (offset * 4) as u64;
    // SAFETY: the range was checked against the tensor's size above.
    unsafe { cudarc::driver::result::memset_d8_async(d, 0, len * 4, be.stream.cu_stream()) }
        .map_err(|e| cuda_err(OP, e))
}
