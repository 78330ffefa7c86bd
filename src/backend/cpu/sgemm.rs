//! m3's own f32 matrix product: operands packed into panels and a register-blocked
//! microkernel, AVX-512 or AVX2 + FMA chosen at run time (the `gemm` crate's stable build
//! stops at AVX2, half the width of the AVX-512 cores PyTorch's BLAS uses).
//!
//! The layout is BLIS's: for each `KC`-deep slice of the inner dimension the right operand
//! is packed into `NR`-wide column panels (`KC × NR`, row after row) and the left operand
//! into `MR`-tall row panels (`KC × MR`, column after column, zero-padded); the microkernel
//! keeps an `MR × NR` tile of the result in registers and streams one panel of each. Work is
//! split over tiles only, never over the inner dimension, so every element is summed in the
//! same order whatever the thread count (training and its resume stay bit-reproducible).

use rayon::prelude::*;

use super::linalg::View;

/// Independent FMA chains in the peak loop: enough to cover the FMA latency (4 cycles) on
/// two FMA ports with room to spare.
const PEAK_CHAINS: usize = 12;

/// Depth of one packed slice: an `NR`-wide panel of it (32 KB at NR = 32) stays in L1.
const KC: usize = 256;

/// Column panels per work item at most.
const GROUP: usize = 8;

/// A microkernel: `c[i*ldc + j] = alpha · Σ_p a(i, p)·b[p*nr + j] + (c[i*ldc + j] when
/// `add`, else `bias[j]` when `bias` is not null)` for `i < mr`, `j < nr`, over `kc` steps,
/// where `a(i, p)` is `a[p*mr + i]` (a packed panel) when `lda == 0` and `a[i*lda + p]`
/// (rows of a row-major operand, read in place) otherwise.
type KernelFn = unsafe fn(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    add: bool,
    bias: *const f32,
);

/// A function applied in place to a piece of a result row.
pub type RowMap = dyn Fn(&mut [f32]) + Sync;

/// What is done to a product's result on its way out, while each tile is still in cache:
/// a bias row added with the first slice (where a destination pre-filled with it cost a
/// pass over the whole result), then a function applied to each finished row piece (the
/// FFN's GELU, which otherwise reads and writes the `[tokens, 4096]` result once more).
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Added to every row (`n` values); only for products that do not accumulate.
    pub bias: Option<&'a [f32]>,
    /// Applied in place to pieces of finished rows.
    pub map: Option<&'a RowMap>,
}

/// A product's destination, `len` floats from `ptr`, borrowed mutably for `'a`: values
/// (`init`; an accumulating product reads them), or fresh room that a plain product fills,
/// which spares the zeroing pass a `vec![0.0; m * n]` costs (1.5% of an encode).
pub struct Dst<'a> {
    ptr: *mut f32,
    len: usize,
    init: bool,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> From<&'a mut [f32]> for Dst<'a> {
    fn from(s: &'a mut [f32]) -> Self {
        Dst {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            init: true,
            _borrow: std::marker::PhantomData,
        }
    }
}

impl<'a> From<&'a mut [std::mem::MaybeUninit<f32>]> for Dst<'a> {
    fn from(s: &'a mut [std::mem::MaybeUninit<f32>]) -> Self {
        Dst {
            ptr: s.as_mut_ptr().cast(),
            len: s.len(),
            init: false,
            _borrow: std::marker::PhantomData,
        }
    }
}

/// One microkernel and its tile shape.
#[derive(Clone, Copy)]
pub struct Kernel {
    /// Instruction set, for tests and benchmarks.
    pub name: &'static str,
    mr: usize,
    nr: usize,
    f: KernelFn,
    /// The peak loop at this kernel's vector width.
    peak: unsafe fn(iters: usize) -> f32,
    /// f32 lanes per vector.
    lanes: usize,
}

impl Kernel {
    /// Runs `iters` rounds of `PEAK_CHAINS` independent vector FMAs held in registers (the
    /// core's f32 FMA peak, the ceiling a GEMM is measured against); returns their sum so
    /// the loop is not optimised away.
    pub fn fma_peak(&self, iters: usize) -> f32 {
        // SAFETY: the kernel is only listed where the CPU has its instruction set.
        unsafe { (self.peak)(iters) }
    }

    /// Floating-point operations in `fma_peak(iters)`.
    pub fn fma_peak_flops(&self, iters: usize) -> f64 {
        (iters * PEAK_CHAINS * self.lanes * 2) as f64
    }

    /// Columns of the register tile: a right operand whose width is a multiple of it packs
    /// without padding.
    pub fn tile_cols(&self) -> usize {
        self.nr
    }

    /// Row panels per block of the left operand: an `MC × KC` block (~170 KB) stays in L2.
    fn mc_panels(&self) -> usize {
        (168 / self.mr).max(1)
    }
}

/// The kernels this CPU can run, fastest first (empty where none applies: the caller then
/// uses the `gemm` crate).
pub fn kernels() -> &'static [Kernel] {
    static K: std::sync::OnceLock<Vec<Kernel>> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        #[allow(unused_mut)]
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Kernel {
                    name: "avx512",
                    mr: x86::MR512,
                    nr: x86::NR512,
                    f: x86::kernel_avx512,
                    peak: x86::peak_avx512,
                    lanes: 16,
                });
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Kernel {
                    name: "avx2",
                    mr: x86::MR256,
                    nr: x86::NR256,
                    f: x86::kernel_avx2,
                    peak: x86::peak_avx2,
                    lanes: 8,
                });
            }
        }
        v
    })
}

/// A right operand `[k, n]` packed once into one kernel's panels, for products that reuse
/// it (attention's keys and values across query blocks, a weight across batches): slice
/// after `KC`-deep slice, each `n_panels` panels of `kc × nr`.
#[derive(Clone)]
pub struct PackedB {
    kern: &'static Kernel,
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs `b` for `kern` (in parallel over slices and panels when `threads > 1`).
    pub fn new(kern: &'static Kernel, b: View, threads: usize) -> Self {
        let mut p = PackedB::empty(kern);
        p.repack(b, threads);
        p
    }

    /// An empty buffer for `kern`, to `repack` into.
    fn empty(kern: &'static Kernel) -> Self {
        PackedB {
            kern,
            k: 0,
            n: 0,
            data: Vec::new(),
        }
    }

    /// Packs `b` into this buffer, reusing its memory.
    pub fn repack(&mut self, b: View, threads: usize) {
        let (k, n, nr) = (b.rows, b.cols, self.kern.nr);
        let n_panels = n.div_ceil(nr);
        self.k = k;
        self.n = n;
        self.data.resize(n_panels * nr * k, 0.0);
        let par = threads > 1 && n * k >= 1 << 16;
        pack_slices(&mut self.data, k, n_panels, nr, par, |p, pc, kc, dst| {
            pack_b_panel(dst, b, pc, kc, p * nr, nr)
        });
    }

    /// The operand back as a row-major `[k, n]` matrix.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n, nr) = (self.k, self.n, self.kern.nr);
        let mut out = vec![0.0; k * n];
        let mut pc = 0;
        while pc < k {
            let kc = KC.min(k - pc);
            let slice = self.slice(pc, kc);
            for (jp, panel) in slice.chunks(nr * kc).enumerate() {
                let (j0, w) = (jp * nr, nr.min(n - jp * nr));
                for p in 0..kc {
                    let row = (pc + p) * n + j0;
                    out[row..row + w].copy_from_slice(&panel[p * nr..p * nr + w]);
                }
            }
            pc += kc;
        }
        out
    }

    /// The kernel it is packed for.
    pub fn kernel(&self) -> &'static Kernel {
        self.kern
    }

    /// Inner dimension.
    pub fn rows(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.n
    }

    /// The packed slice starting at depth `pc` (`kc` deep).
    fn slice(&self, pc: usize, kc: usize) -> &[f32] {
        let width = self.n.div_ceil(self.kern.nr) * self.kern.nr;
        &self.data[pc * width..pc * width + kc * width]
    }
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({} x {} for {})", self.k, self.n, self.kern.name)
    }
}

/// `dst[i*dst_rs + j] = ep.map(alpha · Σ_p a(i,p)·b(p,j) + (dst[..] when accumulate, else
/// ep.bias[j]))` with kernel `kern`, writing every element of the `m × n` result (so `dst`
/// may be fresh room unless accumulating); the views are bounds-checked by the caller.
/// `threads` caps the tiles in flight.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    kern: &'static Kernel,
    dst: Dst,
    dst_rs: usize,
    a: View,
    b: View,
    alpha: f32,
    accumulate: bool,
    ep: Epilogue,
    threads: usize,
) {
    let mut pb = PACK_B
        .with(|c| c.take())
        .unwrap_or_else(|| PackedB::empty(kern));
    pb.kern = kern;
    pb.repack(
        b,
        if parallel(a.rows, a.cols, b.cols, threads) {
            threads
        } else {
            1
        },
    );
    sgemm_packed(dst, dst_rs, a, &pb, alpha, accumulate, ep, threads);
    PACK_B.with(|c| c.replace(Some(pb)));
}

/// Whether a product is worth more than one thread.
fn parallel(m: usize, k: usize, n: usize, threads: usize) -> bool {
    threads > 1 && m * n * k >= 1 << 18
}

/// `sgemm` with the right operand packed already (its kernel is the one used).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_packed(
    dst: Dst,
    dst_rs: usize,
    a: View,
    b: &PackedB,
    alpha: f32,
    accumulate: bool,
    ep: Epilogue,
    threads: usize,
) {
    let kern = b.kern;
    let (m, k, n) = (a.rows, a.cols, b.n);
    assert_eq!(k, b.k, "sgemm inner dimensions");
    assert!(
        dst.init || !accumulate,
        "sgemm: accumulating into unwritten room"
    );
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len,
        "sgemm destination out of bounds"
    );
    if let Some(bias) = ep.bias {
        assert!(!accumulate, "sgemm: a bias with an accumulating product");
        assert_eq!(bias.len(), n, "sgemm bias length");
    }
    let (mr, nr) = (kern.mr, kern.nr);
    let m_panels = m.div_ceil(mr);
    let n_panels = n.div_ceil(nr);
    let serial = !parallel(m, k, n, threads);
    // A row-major left operand is read in place by the kernel (packing it cost as much as
    // the product in attention's narrow ones); only a panel running past row m, or an
    // operand with strided columns, is packed, zero-padded, every slice up front.
    let in_place = a.cs == 1;
    let packed_panels = if in_place {
        usize::from(m % mr != 0)
    } else {
        m_panels
    };
    let first_packed = m_panels - packed_panels;
    let mut pa = scratch(&PACK_A, packed_panels * mr * k);
    pack_slices(
        &mut pa,
        k,
        packed_panels,
        mr,
        !serial && packed_panels > 1,
        |p, pc, kc, dst| pack_a_panel(dst, a, pc, kc, (first_packed + p) * mr, mr),
    );
    // Work items are blocks of row panels by groups of column panels, each run over the
    // whole inner dimension so its part of the result stays in L2 from slice to slice
    // (passing over all of it once per slice sent it to L3 and back k / KC times). Blocks
    // are cut evenly, and there are enough items that two threads finish within a few
    // percent of each other.
    let m_blocks = m_panels.div_ceil(kern.mc_panels());
    let mut n_groups = n_panels.div_ceil(GROUP);
    if !serial {
        n_groups = n_groups.max((4 * threads).div_ceil(m_blocks)).min(n_panels);
    }
    let block = m_panels.div_ceil(m_blocks);
    let group = n_panels.div_ceil(n_groups);
    let (m_blocks, n_groups) = (m_panels.div_ceil(block), n_panels.div_ceil(group));
    let out = SyncPtr(dst.ptr);
    let pa_buf = pa;
    let pa = &pa_buf[..];
    let item = |it: usize| {
        let (blk, g) = (it / n_groups, it % n_groups);
        let ips = blk * block..((blk + 1) * block).min(m_panels);
        let jps = g * group..((g + 1) * group).min(n_panels);
        let mut pc = 0;
        while pc < k {
            let kc = KC.min(k - pc);
            let add = accumulate || pc > 0;
            let last = pc + kc == k;
            let pb = b.slice(pc, kc);
            for jp in jps.clone() {
                let bp = &pb[jp * nr * kc..(jp + 1) * nr * kc];
                for ip in ips.clone() {
                    let (ap, lda) = if ip < first_packed {
                        (a.data[ip * mr * a.rs + pc..].as_ptr(), a.rs)
                    } else {
                        let at = pc * packed_panels * mr + (ip - first_packed) * mr * kc;
                        (pa[at..at + mr * kc].as_ptr(), 0)
                    };
                    // SAFETY: an in-place panel is mr full rows of `a` (bounds-checked by the
                    // caller) from column pc, kc long; tiles of different items never
                    // overlap, and each lies inside `dst` (checked above). A tile is read
                    // only when `add`, after its first slice (or `accumulate`) wrote it, and
                    // mapped after its last.
                    unsafe {
                        tile(
                            kern,
                            kc,
                            ap,
                            lda,
                            bp,
                            out,
                            dst_rs,
                            ip * mr,
                            jp * nr,
                            m,
                            n,
                            alpha,
                            add,
                            ep.bias,
                        );
                        if last {
                            if let Some(f) = ep.map {
                                let (i0, j0) = (ip * mr, jp * nr);
                                let w = nr.min(n - j0);
                                for i in i0..(i0 + mr).min(m) {
                                    f(std::slice::from_raw_parts_mut(
                                        out.0.add(i * dst_rs + j0),
                                        w,
                                    ));
                                }
                            }
                        }
                    };
                }
            }
            pc += kc;
        }
    };
    if serial {
        (0..m_blocks * n_groups).for_each(item);
    } else {
        (0..m_blocks * n_groups).into_par_iter().for_each(item);
    }
    PACK_A.with(|c| c.replace(pa_buf));
}

/// Fills `data`, laid out slice after `KC`-deep slice of `panels` chunks of `width × kc`
/// (PackedB's layout, and the packed left panels'), calling `pack(panel, pc, kc, chunk)`
/// for each chunk (in parallel when `par`).
fn pack_slices(
    data: &mut [f32],
    k: usize,
    panels: usize,
    width: usize,
    par: bool,
    pack: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
) {
    if panels == 0 {
        return;
    }
    // Every slice but the last is KC deep, so every chunk before the last slice's is
    // width × KC and the last slice's are width × (k % KC).
    let (head, tail) = data.split_at_mut(k / KC * panels * width * KC);
    let head_chunk = |(c, dst): (usize, &mut [f32])| pack(c % panels, c / panels * KC, KC, dst);
    let tail_kc = k % KC;
    let tail_chunk = |(p, dst): (usize, &mut [f32])| pack(p, k - tail_kc, tail_kc, dst);
    if par {
        head.par_chunks_mut(width * KC)
            .enumerate()
            .for_each(head_chunk);
        if tail_kc > 0 {
            tail.par_chunks_mut(width * tail_kc)
                .enumerate()
                .for_each(tail_chunk);
        }
    } else {
        head.chunks_mut(width * KC).enumerate().for_each(head_chunk);
        if tail_kc > 0 {
            tail.chunks_mut(width * tail_kc)
                .enumerate()
                .for_each(tail_chunk);
        }
    }
}

thread_local! {
    /// The calling thread's packing buffers, kept between calls: attention runs thousands of
    /// small products per layer, and a fresh zeroed buffer each time cost a fifth of one.
    static PACK_A: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static PACK_B: std::cell::RefCell<Option<PackedB>> = const { std::cell::RefCell::new(None) };
}

/// Takes the thread's buffer out (a nested call, e.g. from a task rayon runs while this
/// thread waits, finds it empty and allocates its own) and sizes it to `len`; packing
/// overwrites every element, so old contents do not matter.
fn scratch(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>,
    len: usize,
) -> Vec<f32> {
    let mut v = key.with(|c| c.take());
    v.resize(len, 0.0);
    v
}

/// A pointer shared by the tile workers, each writing a disjoint tile.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: workers write disjoint tiles only.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

/// One `mr × nr` tile at `(i0, j0)` from left panel `a` (`lda` as in `KernelFn`), plus
/// `bias[j0..]` when not `add`; edge tiles go through a register-sized scratch tile.
///
/// # Safety
/// `a` must hold the panel's `kc` steps, and the tile's in-range part must lie inside the
/// destination, written by no one else.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    kern: &Kernel,
    kc: usize,
    a: *const f32,
    lda: usize,
    bp: &[f32],
    out: SyncPtr,
    ldc: usize,
    i0: usize,
    j0: usize,
    m: usize,
    n: usize,
    alpha: f32,
    add: bool,
    bias: Option<&[f32]>,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let c = out.0.add(i0 * ldc + j0);
    if i0 + mr <= m && j0 + nr <= n {
        let bias = match bias {
            Some(b) if !add => b[j0..].as_ptr(),
            _ => std::ptr::null(),
        };
        (kern.f)(kc, a, lda, bp.as_ptr(), c, ldc, alpha, add, bias);
        return;
    }
    let mut scratch = [0.0f32; 32 * 32];
    (kern.f)(
        kc,
        a,
        lda,
        bp.as_ptr(),
        scratch.as_mut_ptr(),
        nr,
        alpha,
        false,
        std::ptr::null(),
    );
    for i in 0..mr.min(m - i0) {
        for j in 0..nr.min(n - j0) {
            let d = c.add(i * ldc + j);
            let s = scratch[i * nr + j];
            *d = match bias {
                _ if add => *d + s,
                Some(b) => s + b[j0 + j],
                None => s,
            };
        }
    }
}

/// Columns `j0..j0+nr` of rows `pc..pc+kc` of `b`, row after row, zero past the last column.
fn pack_b_panel(dst: &mut [f32], b: View, pc: usize, kc: usize, j0: usize, nr: usize) {
    let w = nr.min(b.cols - j0);
    if b.cs == 1 {
        for p in 0..kc {
            let base = (pc + p) * b.rs + j0;
            let row = &mut dst[p * nr..(p + 1) * nr];
            row[..w].copy_from_slice(&b.data[base..base + w]);
            row[w..].fill(0.0);
        }
        return;
    }
    // A transposed operand (attention's Kᵀ, a weight's transpose): read each column where
    // it is contiguous, write it down the panel.
    for j in 0..w {
        let base = pc * b.rs + (j0 + j) * b.cs;
        for p in 0..kc {
            dst[p * nr + j] = b.data[base + p * b.rs];
        }
    }
    if w < nr {
        for p in 0..kc {
            dst[p * nr + w..(p + 1) * nr].fill(0.0);
        }
    }
}

/// Rows `i0..i0+mr` of columns `pc..pc+kc` of `a`, column after column, zero past the last
/// row.
fn pack_a_panel(dst: &mut [f32], a: View, pc: usize, kc: usize, i0: usize, mr: usize) {
    let h = mr.min(a.rows - i0);
    if a.rs == 1 {
        // Column-major (a transposed row-major operand): each column's rows are contiguous.
        for p in 0..kc {
            let base = i0 + (pc + p) * a.cs;
            let col = &mut dst[p * mr..(p + 1) * mr];
            col[..h].copy_from_slice(&a.data[base..base + h]);
            col[h..].fill(0.0);
        }
        return;
    }
    for i in 0..h {
        let base = (i0 + i) * a.rs + pc * a.cs;
        for p in 0..kc {
            dst[p * mr + i] = a.data[base + p * a.cs];
        }
    }
    for i in h..mr {
        for p in 0..kc {
            dst[p * mr + i] = 0.0;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX-512 tile: 8 rows × 2 vectors of 16 = 16 accumulators + 2 of B + 1 broadcast of
    /// the 32 registers. Not the 14 rows the registers allow: rows read in place lie a
    /// power of two apart in the encoder's shapes, so a tile's rows all fall in one L1 set,
    /// and past the set's 12 ways they evict each other. On a 2-vCPU AMD EPYC (Zen 5)
    /// 8–11 rows ran the encoder's products 1.1–1.25× faster than 14 (BENCHMARKS.md).
    pub const MR512: usize = 8;
    /// AVX-512 tile width.
    pub const NR512: usize = 32;
    /// AVX2 tile: 6 rows × 2 vectors of 8 = 12 accumulators + 2 of B + 1 broadcast of the 16.
    pub const MR256: usize = 6;
    /// AVX2 tile width.
    pub const NR256: usize = 16;

    /// One instruction set's microkernel (`KernelFn`), its accumulation loop and its FMA
    /// peak loop (`Kernel::fma_peak`): the same code at two vector widths.
    macro_rules! isa {
        (
            $feature:literal, $kernel:ident, $steps:ident, $peak:ident, $mr:ident, $nr:ident,
            $lanes:literal, $v:ty, $zero:ident, $load:ident, $store:ident, $set1:ident,
            $fmadd:ident, $mul:ident, $add:ident
        ) => {
            /// The microkernel (see `KernelFn`).
            ///
            /// # Safety
            /// The CPU has the instruction set; `a` holds the panel's `kc` steps, `b`
            /// `kc × nr` floats, `c` an `mr × nr` tile with row stride `ldc`, and `bias`
            /// is null or `nr` floats.
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $kernel(
                kc: usize,
                a: *const f32,
                lda: usize,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
                alpha: f32,
                add: bool,
                bias: *const f32,
            ) {
                // The tile's rows are a power-of-two stride apart in the encoder's shapes, so
                // they share L1 sets: fetch them while the FMAs run instead of stalling on
                // the stores.
                for i in 0..$mr {
                    for j in (0..$nr).step_by(16) {
                        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + j) as *const i8);
                    }
                }
                let acc = if lda == 0 {
                    $steps(kc, |p, i| a.add(p * $mr + i), b)
                } else {
                    $steps(kc, |p, i| a.add(i * lda + p), b)
                };
                let al = $set1(alpha);
                for (i, row) in acc.iter().enumerate() {
                    let cp = c.add(i * ldc);
                    for (j, v) in row.iter().enumerate() {
                        let mut r = $mul(*v, al);
                        if add {
                            r = $add(r, $load(cp.add($lanes * j)));
                        } else if !bias.is_null() {
                            r = $add(r, $load(bias.add($lanes * j)));
                        }
                        $store(cp.add($lanes * j), r);
                    }
                }
            }

            /// The accumulation loop of the microkernel, `at(p, i)` addressing a(i, p).
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn $steps(
                kc: usize,
                at: impl Fn(usize, usize) -> *const f32,
                b: *const f32,
            ) -> [[$v; 2]; $mr] {
                let mut acc = [[$zero(); 2]; $mr];
                for p in 0..kc {
                    let b0 = $load(b.add(p * $nr));
                    let b1 = $load(b.add(p * $nr + $lanes));
                    for (i, row) in acc.iter_mut().enumerate() {
                        let x = $set1(*at(p, i));
                        row[0] = $fmadd(x, b0, row[0]);
                        row[1] = $fmadd(x, b1, row[1]);
                    }
                }
                acc
            }

            /// The FMA peak loop (see `Kernel::fma_peak`).
            ///
            /// # Safety
            /// The CPU has the instruction set.
            #[target_feature(enable = $feature)]
            pub unsafe fn $peak(iters: usize) -> f32 {
                let mut acc = [$zero(); super::PEAK_CHAINS];
                let (x, y) = ($set1(0.999_999), $set1(1e-7));
                for _ in 0..iters {
                    for a in acc.iter_mut() {
                        *a = $fmadd(*a, x, y);
                    }
                }
                let s = acc.iter().fold($zero(), |s, a| $add(s, *a));
                let mut out = [0f32; $lanes];
                $store(out.as_mut_ptr(), s);
                out.iter().sum()
            }
        };
    }

    isa!(
        "avx512f",
        kernel_avx512,
        steps_avx512,
        peak_avx512,
        MR512,
        NR512,
        16,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps,
        _mm512_add_ps
    );
    isa!(
        "avx2,fma",
        kernel_avx2,
        steps_avx2,
        peak_avx2,
        MR256,
        NR256,
        8,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_mul_ps,
        _mm256_add_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let mut rng = Rng::new(3);
        let (m, k, n) = (301, 700, 257);
        let av = rng.vec(m * k, -1.0, 1.0);
        let bv = rng.vec(k * n, -1.0, 1.0);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for kern in kernels() {
            let run = |threads| {
                let mut c = vec![0.0; m * n];
                let (a, b) = (View::rows(&av, m, k), View::rows(&bv, k, n));
                sgemm(
                    kern,
                    c.as_mut_slice().into(),
                    n,
                    a,
                    b,
                    1.0,
                    false,
                    Epilogue::default(),
                    threads,
                );
                c
            };
            let one = run(1);
            let two = pool.install(|| run(2));
            let same = one
                .iter()
                .zip(&two)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{}: one and two threads differ", kern.name);
        }
    }

    #[test]
    fn unpacking_gives_the_operand_back() {
        // Two `KC` slices, the second short, and a last panel only partly filled.
        let (k, n) = (KC + 44, 45);
        let bv = Rng::new(9).vec(k * n, -1.0, 1.0);
        for kern in kernels() {
            let p = PackedB::new(kern, View::rows(&bv, k, n), 2);
            assert!(p.unpack() == bv, "{}: unpacked operand differs", kern.name);
        }
    }

    #[test]
    fn the_fma_peak_loop_counts_its_flops() {
        for kern in kernels() {
            // 12 chains × lanes × 2 flops per round; the loop's value is finite.
            assert_eq!(kern.fma_peak_flops(10), (10 * 12 * kern.lanes * 2) as f64);
            assert!(kern.fma_peak(1000).is_finite());
        }
    }
}
