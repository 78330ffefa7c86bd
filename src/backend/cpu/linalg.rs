//! A bounds-checked front for the strided f32 matrix product: m3's own packed kernels
//! (`sgemm`) where the CPU has AVX2 or AVX-512, the `gemm` crate elsewhere.

use super::sgemm;
pub use super::sgemm::Epilogue;

/// A read-only strided matrix view over a slice: element (r, c) is `data[r*rs + c*cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    /// Backing elements.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A dense row-major `[rows, cols]` matrix starting at `data[0]`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// `op(X)` as a `[rows, cols]` operand: `X` row-major `[rows, cols]`, or, when
    /// `trans`, the transpose of a row-major `[cols, rows]` `X` (BLAS's `op`).
    pub fn op(data: &'a [f32], rows: usize, cols: usize, trans: bool) -> Self {
        if trans {
            View::rows(data, cols, rows).t()
        } else {
            View::rows(data, rows, cols)
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every addressed element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[i*dst_rs + j] (+)= alpha · Σ_p a(i,p)·b(p,j)` for an `[a.rows, b.cols]` result.
/// Panics on mismatched or out-of-range views: callers validate shapes first, so a panic
/// here is a bug in m3, never a consequence of user input.
pub fn gemm(
    dst: &mut [f32],
    dst_rs: usize,
    a: View,
    b: View,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    gemm_using(
        default_impl(),
        dst,
        dst_rs,
        a,
        b,
        alpha,
        accumulate,
        threads,
    );
}

/// One implementation of the product, for `gemm_using`.
#[derive(Clone, Copy)]
pub enum GemmImpl {
    /// m3's packed kernel for one instruction set.
    Packed(&'static sgemm::Kernel),
    /// The `gemm` crate.
    Crate,
}

impl GemmImpl {
    /// Short name for benchmarks.
    pub fn name(&self) -> &'static str {
        match self {
            GemmImpl::Packed(k) => k.name,
            GemmImpl::Crate => "gemm-crate",
        }
    }
}

/// Every implementation this CPU runs, the default first.
pub fn gemm_impls() -> Vec<GemmImpl> {
    let mut v: Vec<GemmImpl> = sgemm::kernels().iter().map(GemmImpl::Packed).collect();
    v.push(GemmImpl::Crate);
    v
}

/// `CHOSEN` before `choose_gemm` names an implementation: the fastest packed kernel.
const AUTO: usize = usize::MAX;

/// Index into `gemm_impls()` of the implementation `gemm` uses, or `AUTO`.
static CHOSEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(AUTO);

/// Makes `gemm` use the implementation named `name` (one of `gemm_impls()`' names) for the
/// rest of the process, so benchmarks can compare them inside one binary; the error lists
/// the names this CPU has.
pub fn choose_gemm(name: &str) -> Result<(), String> {
    let impls = gemm_impls();
    match impls.iter().position(|i| i.name() == name) {
        Some(i) => {
            CHOSEN.store(i, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        None => Err(format!(
            "no matrix-product implementation {name:?} on this CPU; it has: {}",
            impls
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Name of the implementation `gemm` uses now.
pub fn gemm_in_use() -> &'static str {
    default_impl().name()
}

/// The implementation `gemm` uses: the fastest packed kernel unless `choose_gemm` said
/// otherwise, else the `gemm` crate.
fn default_impl() -> GemmImpl {
    let kernels = sgemm::kernels();
    let chosen = match CHOSEN.load(std::sync::atomic::Ordering::Relaxed) {
        AUTO => fastest_kernel(kernels),
        i => i,
    };
    match kernels.get(chosen) {
        Some(k) => GemmImpl::Packed(k),
        None => GemmImpl::Crate,
    }
}

/// Index of the kernel that runs a sample of the encoder's products fastest here, timed
/// once per process (~40 ms). The widest is not always it: on a 2-vCPU AMD EPYC with
/// AVX-512 the AVX2 kernel ran 2048-row products 1.2–1.5× faster, and the encoder 1.2×
/// (BENCHMARKS.md). Every kernel gives the same bits (tested), so the choice never changes
/// a result.
fn fastest_kernel(kernels: &'static [sgemm::Kernel]) -> usize {
    static FASTEST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *FASTEST.get_or_init(|| {
        if kernels.len() < 2 {
            return 0;
        }
        // One thread, so the timing is the kernel's and not the pool's; big enough that a
        // product is milliseconds, small enough that the whole choice stays unnoticed.
        let (m, k, n) = (512, 1024, 512);
        let av: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.25 - 0.75).collect();
        let bv: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.125 - 0.25).collect();
        let mut c = vec![0.0f32; m * n];
        let (a, b) = (View::rows(&av, m, k), View::rows(&bv, k, n));
        let time = |kern: &'static sgemm::Kernel, c: &mut [f32]| {
            let t = std::time::Instant::now();
            sgemm::sgemm(kern, c.into(), n, a, b, 1.0, false, Epilogue::default(), 1);
            t.elapsed()
        };
        let best = |kern| (0..3).map(|_| time(kern, &mut c)).min().unwrap_or_default();
        let times: Vec<_> = kernels.iter().map(best).collect();
        (0..kernels.len()).min_by_key(|&i| times[i]).unwrap_or(0)
    })
}

/// `gemm` with a chosen implementation (benchmarks compare them); same contract.
#[allow(clippy::too_many_arguments)]
pub fn gemm_using(
    imp: GemmImpl,
    dst: &mut [f32],
    dst_rs: usize,
    a: View,
    b: View,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    assert!(b.in_bounds(), "gemm operand view out of bounds");
    if !check(dst, dst_rs, a, b.rows, b.cols, accumulate) {
        return;
    }
    match imp {
        GemmImpl::Packed(kern) => {
            let ep = Epilogue::default();
            sgemm::sgemm(
                kern,
                dst.into(),
                dst_rs,
                a,
                b,
                alpha,
                accumulate,
                ep,
                threads,
            )
        }
        GemmImpl::Crate => crate_gemm(dst, dst_rs, a, b, alpha, accumulate, threads),
    }
}

/// `dst[i*dst_rs + j] = ep.map(Σ_p a(i,p)·b(p,j) + ep.bias[j])` (a layer's `x Wᵀ + b`, and
/// its activation) with implementation `imp`: m3's kernels apply the epilogue to each tile
/// as it is finished; the `gemm` crate gets a destination pre-filled with the bias and a
/// pass of `map` afterwards, with the same result bits.
pub fn gemm_epilogue_using(
    imp: GemmImpl,
    dst: &mut [f32],
    dst_rs: usize,
    a: View,
    b: View,
    ep: Epilogue,
    threads: usize,
) {
    let (m, n) = (a.rows, b.cols);
    if let Some(bias) = ep.bias {
        assert_eq!(bias.len(), n, "gemm bias length");
    }
    match imp {
        GemmImpl::Packed(kern) if b.in_bounds() && a.cols > 0 => {
            if check(dst, dst_rs, a, b.rows, n, false) {
                sgemm::sgemm(kern, dst.into(), dst_rs, a, b, 1.0, false, ep, threads);
            }
        }
        _ => {
            // No inner dimension (the result is the bias alone), or the `gemm` crate.
            if let Some(bias) = ep.bias {
                for i in 0..m {
                    dst[i * dst_rs..i * dst_rs + n].copy_from_slice(bias);
                }
            }
            gemm_using(imp, dst, dst_rs, a, b, 1.0, ep.bias.is_some(), threads);
            if let Some(f) = ep.map {
                use rayon::prelude::*;
                let rows = dst.par_chunks_mut(dst_rs.max(1)).take(m);
                rows.for_each(|row| f(&mut row[..n]));
            }
        }
    }
}

/// `out` replaced by the `[a.rows, b.cols]` result of `gemm_epilogue_using` with the
/// implementation `gemm` uses (row stride `b.cols`), written straight into its capacity:
/// m3's kernels write every element of a product that does not accumulate, so the result
/// is not zeroed first.
pub fn gemm_epilogue_fresh(out: &mut Vec<f32>, a: View, b: View, ep: Epilogue, threads: usize) {
    gemm_epilogue_fresh_using(default_impl(), out, a, b, ep, threads)
}

/// `gemm_epilogue_fresh` with a chosen implementation; same contract.
pub fn gemm_epilogue_fresh_using(
    imp: GemmImpl,
    out: &mut Vec<f32>,
    a: View,
    b: View,
    ep: Epilogue,
    threads: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    out.clear();
    match imp {
        GemmImpl::Packed(kern) if m > 0 && k > 0 && n > 0 => {
            assert!(b.in_bounds(), "gemm operand view out of bounds");
            fresh_result(out, a, b.rows, n, &ep, |room| {
                sgemm::sgemm(kern, room, n, a, b, 1.0, false, ep, threads)
            });
        }
        _ => {
            out.resize(m * n, 0.0);
            gemm_epilogue_using(imp, out, n, a, b, ep, threads);
        }
    }
}

/// Checks a left operand and a bias against a `[k, n]` right operand, then replaces `out` by
/// the `[a.rows, n]` result that `product`, one of m3's kernels on a product that does not
/// accumulate, writes into `out`'s unzeroed capacity.
fn fresh_result(
    out: &mut Vec<f32>,
    a: View,
    k: usize,
    n: usize,
    ep: &Epilogue,
    product: impl FnOnce(sgemm::Dst),
) {
    let len = a.rows * n;
    assert_eq!(a.cols, k, "gemm inner dimensions");
    assert!(a.in_bounds(), "gemm operand view out of bounds");
    if let Some(bias) = ep.bias {
        assert_eq!(bias.len(), n, "gemm bias length");
    }
    out.clear();
    out.reserve(len);
    product((&mut out.spare_capacity_mut()[..len]).into());
    // SAFETY: the kernel wrote all `len` elements (`sgemm`'s contract for a product that
    // does not accumulate).
    unsafe { out.set_len(len) };
}

/// `b` (`[k, n]`) packed once for the kernel `gemm` uses, for a weight that many products
/// take as their right operand; `None` where that is the `gemm` crate (it packs per call), or
/// where the panels would need padding (`n` not a multiple of the tile's width).
pub fn pack_weight(b: View, threads: usize) -> Option<sgemm::PackedB> {
    assert!(b.in_bounds(), "gemm operand view out of bounds");
    match default_impl() {
        GemmImpl::Packed(kern)
            if b.rows > 0 && b.cols > 0 && b.cols.is_multiple_of(kern.tile_cols()) =>
        {
            Some(sgemm::PackedB::new(kern, b, threads))
        }
        _ => None,
    }
}

/// `gemm_epilogue_fresh` with a weight packed by `pack_weight`: its panels are used as they
/// are when it was packed for the kernel `gemm` uses now, else (`choose_gemm` changed the
/// choice since) it is unpacked for this product, so the result's bits are always those of
/// `gemm_epilogue_fresh` on the unpacked weight.
pub fn gemm_epilogue_fresh_packed(
    out: &mut Vec<f32>,
    a: View,
    b: &sgemm::PackedB,
    ep: Epilogue,
    threads: usize,
) {
    let (m, n) = (a.rows, b.cols());
    match default_impl() {
        GemmImpl::Packed(kern) if std::ptr::eq(kern, b.kernel()) && m > 0 => {
            fresh_result(out, a, b.rows(), n, &ep, |room| {
                sgemm::sgemm_packed(room, n, a, b, 1.0, false, ep, threads)
            });
        }
        _ => {
            let w = b.unpack();
            gemm_epilogue_fresh(out, a, View::rows(&w, b.rows(), n), ep, threads);
        }
    }
}

/// A right operand made ready for many products with different left operands (attention's
/// keys and values across query blocks): packed once for m3's kernel, or kept as a view for
/// the `gemm` crate, which packs per call.
pub enum Rhs<'a> {
    /// Packed panels.
    Packed(sgemm::PackedB),
    /// The operand as it is.
    View(View<'a>),
}

impl<'a> Rhs<'a> {
    /// Prepares `b` for the implementation `gemm` uses now.
    pub fn new(b: View<'a>) -> Self {
        Rhs::with(default_impl(), b)
    }

    /// Prepares `b` for implementation `imp`.
    pub fn with(imp: GemmImpl, b: View<'a>) -> Self {
        assert!(b.in_bounds(), "gemm operand view out of bounds");
        match imp {
            GemmImpl::Packed(kern) => Rhs::Packed(sgemm::PackedB::new(kern, b, 1)),
            GemmImpl::Crate => Rhs::View(b),
        }
    }

    /// `(rows, cols)` of the operand.
    fn dims(&self) -> (usize, usize) {
        match self {
            Rhs::Packed(p) => (p.rows(), p.cols()),
            Rhs::View(v) => (v.rows, v.cols),
        }
    }
}

/// `gemm` with a prepared right operand; same contract.
pub fn gemm_rhs(
    dst: &mut [f32],
    dst_rs: usize,
    a: View,
    b: &Rhs,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    let (k, n) = b.dims();
    if !check(dst, dst_rs, a, k, n, accumulate) {
        return;
    }
    match b {
        Rhs::Packed(p) => {
            let ep = Epilogue::default();
            sgemm::sgemm_packed(dst.into(), dst_rs, a, p, alpha, accumulate, ep, threads)
        }
        Rhs::View(v) => crate_gemm(dst, dst_rs, a, *v, alpha, accumulate, threads),
    }
}

/// Checks the left operand and destination against a `[k, n]` right operand; false when
/// there is nothing left to compute (an empty result, or `k == 0`, handled here).
fn check(dst: &mut [f32], dst_rs: usize, a: View, k: usize, n: usize, accumulate: bool) -> bool {
    let m = a.rows;
    assert_eq!(a.cols, k, "gemm inner dimensions");
    assert!(a.in_bounds(), "gemm operand view out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "gemm destination out of bounds"
    );
    if m == 0 || n == 0 {
        return false;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return false;
    }
    true
}

/// The `gemm` crate's product on views already checked by `gemm_using`.
fn crate_gemm(
    dst: &mut [f32],
    dst_rs: usize,
    a: View,
    b: View,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let par = if threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: all three views were bounds-checked above for exactly these m, n, k and strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// `(m, k, n)` around the tile edges (14/6 rows, 32/16 columns), the 256-deep slice and
    /// the 12-panel row block.
    const SHAPES: [(usize, usize, usize); 10] = [
        (1, 1, 1),
        (13, 7, 5),
        (14, 128, 32),
        (15, 129, 33),
        (6, 3, 16),
        (7, 300, 17),
        (100, 70, 300),
        (169, 513, 65),
        (3, 600, 40),
        (28, 256, 64),
    ];

    /// Every implementation, through `gemm_using` and through a prepared `Rhs`, on `SHAPES`
    /// with transposed and plain operands, overwrite and accumulate, against an f64 triple
    /// loop; the bound is f32's worst case for a k-term dot product, far below what a wrong
    /// index or a lost slice would be off by.
    fn check_all(threads: usize) {
        let mut rng = Rng::new(17);
        for imp in gemm_impls() {
            for &(m, k, n) in &SHAPES {
                let cases = [
                    (false, false, false),
                    (true, false, true),
                    (false, true, true),
                    (true, true, false),
                ];
                for (ta, tb, acc) in cases {
                    let av = rng.vec(m * k, -1.0, 1.0);
                    let bv = rng.vec(k * n, -1.0, 1.0);
                    let a = View::op(&av, m, k, ta);
                    let b = View::op(&bv, k, n, tb);
                    let ld = n + 3;
                    let init = rng.vec(m * ld, -1.0, 1.0);
                    let alpha = 0.75;
                    let mut direct = init.clone();
                    gemm_using(imp, &mut direct, ld, a, b, alpha, acc, threads);
                    let mut prepared = init.clone();
                    gemm_rhs(
                        &mut prepared,
                        ld,
                        a,
                        &Rhs::with(imp, b),
                        alpha,
                        acc,
                        threads,
                    );
                    for (how, got) in [("direct", &direct), ("prepared", &prepared)] {
                        let what =
                            format!("{} {how} m{m} k{k} n{n} ta{ta} tb{tb} acc{acc}", imp.name());
                        for i in 0..m {
                            for j in 0..n {
                                let (mut s, mut bound) = (0f64, 0f64);
                                for p in 0..k {
                                    let x = av[if ta { p * m + i } else { i * k + p }] as f64
                                        * bv[if tb { j * k + p } else { p * n + j }] as f64;
                                    s += x;
                                    bound += x.abs();
                                }
                                let want = alpha as f64 * s
                                    + if acc { init[i * ld + j] as f64 } else { 0.0 };
                                let tol =
                                    2.0 * (k + 2) as f64 * f32::EPSILON as f64 * (bound + 1.0);
                                let g = got[i * ld + j] as f64;
                                assert!((g - want).abs() <= tol, "{what} ({i},{j}): {g} vs {want}");
                            }
                            // The padding columns past n are never written.
                            for j in n..ld {
                                assert_eq!(
                                    got[i * ld + j],
                                    init[i * ld + j],
                                    "{what}: wrote past column {n}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The epilogue (bias with the first slice, the map on finished tiles) gives the bits
    /// of the plain product into a bias-filled destination followed by a pass of the map,
    /// for every implementation, on `SHAPES` plus an empty inner dimension, leaving the
    /// padding columns alone; so does a fresh result written into unzeroed room.
    fn check_epilogue(threads: usize) {
        let mut rng = Rng::new(29);
        let map = |row: &mut [f32]| row.iter_mut().for_each(|v| *v = (*v * 0.5).tanh() + *v);
        for imp in gemm_impls() {
            for &(m, k, n) in SHAPES.iter().chain(&[(3, 0, 5), (30, 600, 70)]) {
                for tb in [false, true] {
                    let av = rng.vec(m * k, -1.0, 1.0);
                    let bv = rng.vec(k * n, -1.0, 1.0);
                    let bias = rng.vec(n, -1.0, 1.0);
                    let a = View::rows(&av, m, k);
                    let b = View::op(&bv, k, n, tb);
                    let ld = n + 2;
                    let init = rng.vec(m * ld, -1.0, 1.0);
                    let mut plain = init.clone();
                    for i in 0..m {
                        plain[i * ld..i * ld + n].copy_from_slice(&bias);
                    }
                    gemm_using(imp, &mut plain, ld, a, b, 1.0, true, threads);
                    let mut mapped = plain.clone();
                    for i in 0..m {
                        map(&mut mapped[i * ld..i * ld + n]);
                    }
                    for (with_map, want) in [(false, &plain), (true, &mapped)] {
                        let mut got = init.clone();
                        let ep = Epilogue {
                            bias: Some(&bias),
                            map: if with_map { Some(&map) } else { None },
                        };
                        gemm_epilogue_using(imp, &mut got, ld, a, b, ep, threads);
                        let what = format!("{} m{m} k{k} n{n} tb{tb} map{with_map}", imp.name());
                        for (at, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                            let (i, j) = (at / ld, at % ld);
                            assert_eq!(g.to_bits(), w.to_bits(), "{what} ({i},{j}): {g} vs {w}");
                        }
                        // Into room that holds NaNs: an element the product failed to
                        // write would show.
                        let mut fresh = vec![f32::NAN; m * n + 7];
                        fresh.clear();
                        gemm_epilogue_fresh_using(imp, &mut fresh, a, b, ep, threads);
                        assert_eq!(fresh.len(), m * n, "{what}: fresh length");
                        for (at, g) in fresh.iter().enumerate() {
                            let (i, j) = (at / n, at % n);
                            let w = want[i * ld + j];
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{what} fresh ({i},{j}): {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_epilogue_matches_a_filled_product_and_a_pass_on_one_thread() {
        check_epilogue(1);
    }

    #[test]
    fn the_epilogue_matches_a_filled_product_and_a_pass_on_two_threads() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| check_epilogue(2));
    }

    /// Every packed kernel gives the bits of the first (the run-time choice among them
    /// must not change a result, or a resumed training run), on `SHAPES` and shapes with
    /// several `KC` slices, transposed or not, accumulating or not, with a bias.
    #[test]
    fn every_packed_kernel_gives_the_same_bits() {
        let mut rng = Rng::new(31);
        let kernels: Vec<GemmImpl> = gemm_impls()
            .into_iter()
            .filter(|i| matches!(i, GemmImpl::Packed(_)))
            .collect();
        let shapes = SHAPES.iter().chain(&[(64, 1100, 96), (33, 600, 70)]);
        for &(m, k, n) in shapes {
            for (ta, tb, acc) in [
                (false, false, false),
                (true, true, true),
                (false, true, true),
            ] {
                let av = rng.vec(m * k, -1.0, 1.0);
                let bv = rng.vec(k * n, -1.0, 1.0);
                let bias = rng.vec(n, -1.0, 1.0);
                let init = rng.vec(m * n, -1.0, 1.0);
                let (a, b) = (View::op(&av, m, k, ta), View::op(&bv, k, n, tb));
                let run = |imp: GemmImpl| {
                    let mut c = init.clone();
                    if acc {
                        gemm_using(imp, &mut c, n, a, b, 0.75, true, 1);
                    } else {
                        let ep = Epilogue {
                            bias: Some(&bias),
                            map: None,
                        };
                        gemm_epilogue_using(imp, &mut c, n, a, b, ep, 1);
                    }
                    c
                };
                let first = run(kernels[0]);
                for &imp in &kernels[1..] {
                    let got = run(imp);
                    for (at, (g, w)) in got.iter().zip(&first).enumerate() {
                        let what = format!("{} m{m} k{k} n{n} ta{ta} tb{tb} acc{acc}", imp.name());
                        assert_eq!(g.to_bits(), w.to_bits(), "{what} at {at}: {g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_implementation_matches_f64_on_one_thread() {
        check_all(1);
    }

    #[test]
    fn every_implementation_matches_f64_on_two_threads() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| check_all(2));
    }

    #[test]
    fn x86_cpus_with_avx2_get_a_packed_kernel() {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if avx2 {
                assert!(matches!(gemm_impls()[0], GemmImpl::Packed(_)));
                assert!(gemm_impls().iter().any(|i| i.name() == "avx2"));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                assert_eq!(gemm_impls()[0].name(), "avx512");
            }
        }
        assert_eq!(gemm_impls().last().map(|i| i.name()), Some("gemm-crate"));
    }
}
