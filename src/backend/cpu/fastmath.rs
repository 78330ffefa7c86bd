//! Vectorisable elementwise maths for the CPU backend: `exp` and `erfc` as straight-line
//! f32 code the compiler turns into vector loops (a libm call per element stays scalar),
//! and exact GELU and its derivative built on them, compiled for AVX2 + FMA where the CPU
//! has it.

use rayon::prelude::*;

/// Whether the CPU has AVX2 and FMA: the build targets baseline x86-64, whose SSE2
/// vectorises the softmax loops 4 lanes wide instead of 8, so the row loops below also come
/// in an AVX2 + FMA compilation chosen at run time (measured on the 2-core VM: the tiny
/// fixture model's whole encode 18.9 s -> 13.3 s).
pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `exp(x)` for `x <= 0` (scores minus their row max), Cephes' expf: relative error about
/// 1e-7, and straight-line code the compiler vectorises, unlike a libm call per element.
#[inline(always)]
pub(super) fn exp_nonpos(x: f32) -> f32 {
    // A plain compare (not f32::max, whose NaN rule blocks vectorising); scores are finite.
    let x = if x < -87.0 { -87.0 } else { x };
    // Round x·log2(e) to the nearest integer n with the 1.5·2^23 trick (no SSE4.1 needed);
    // the shifted value's low mantissa bits are n itself, which gives 2^n below without a
    // float-to-int conversion (Rust's saturating `as i32` does not vectorise well).
    let shifted = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let n_int = shifted.to_bits().wrapping_sub(0x4B40_0000) as i32;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// `erfc(z)` to about 1e-7 relative wherever the result is a normal f32: Numerical Recipes'
/// Chebyshev fit `t·exp(-z² + P(t))`, `t = 1/(1 + |z|/2)`, reflected as `2 - erfc(|z|)` for
/// `z < 0`. Past `|z| ≈ 9.3` the true value is below f32's normal range and this returns
/// at most ~1e-38 instead of a denormal or 0; NaN stays NaN.
#[inline(always)]
pub(super) fn erfc(z: f32) -> f32 {
    let a = f32::from_bits(z.to_bits() & 0x7fff_ffff);
    // Past 10 the value is 0 in f32 anyway; the clamp keeps ∞ from making ∞ - ∞ below (a
    // plain compare, so NaN passes through).
    let a = if a > 10.0 { 10.0 } else { a };
    let t = 1.0 / (1.0 + 0.5 * a);
    let mut p = 0.170_872_77f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_9;
    p = p * t - 1.135_204;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_7;
    p = p * t - 1.265_512_2;
    // exp(-a² + p) in two factors: -a² as one f32 near -81 is only good to ~5e-6, so a is
    // split into `hi` (its top 12 bits, hi² exact) and the rest, as in fdlibm's erfc. The
    // second exponent is at most ~3e-8 (p at z = 0), inside exp_nonpos's range reduction.
    let hi = f32::from_bits(a.to_bits() & 0xffff_f000);
    let e = t * exp_nonpos(-hi * hi) * exp_nonpos((hi - a) * (a + hi) + p);
    if z < 0.0 {
        2.0 - e
    } else {
        e
    }
}

/// Exact GELU `x·Φ(x)`, with `Φ(x) = erfc(-x/√2)/2` so the left tail keeps its relative
/// accuracy (no `1 + erf` cancellation).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * erfc(-x * std::f32::consts::FRAC_1_SQRT_2)
}

/// Derivative of exact GELU: `Φ(x) + x·φ(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * erfc(-x * std::f32::consts::FRAC_1_SQRT_2);
    let pdf = exp_nonpos(-0.5 * x * x) * 0.398_942_3;
    cdf + x * pdf
}

/// A pointwise function for the vector loops below, as a type: its `#[inline(always)]`
/// body is always inlined into their AVX2 compilations. A closure passed in was not
/// always (it depends on how the crate is split into codegen units): each element then
/// cost a call, unvectorised, 7–15% of a CPU training step (BENCHMARKS.md).
pub(super) trait Unary: Sync {
    /// The value at `x`.
    fn at(x: f32) -> f32;
}

/// A two-argument pointwise function, as `Unary`.
pub(super) trait Binary: Sync {
    /// The value at `(a, b)`.
    fn at(a: f32, b: f32) -> f32;
}

/// Exact GELU.
pub(super) struct Gelu;

impl Unary for Gelu {
    #[inline(always)]
    fn at(x: f32) -> f32 {
        gelu(x)
    }
}

/// GELU's backward, `dy · gelu'(x)` at `(dy, x)`.
pub(super) struct GeluBackward;

impl Binary for GeluBackward {
    #[inline(always)]
    fn at(d: f32, x: f32) -> f32 {
        d * gelu_grad(x)
    }
}

/// ReLU's backward, `dy` where `x > 0`, else 0, at `(dy, x)`.
pub(super) struct ReluBackward;

impl Binary for ReluBackward {
    #[inline(always)]
    fn at(d: f32, x: f32) -> f32 {
        if x > 0.0 {
            d
        } else {
            0.0
        }
    }
}

/// Elements per parallel chunk of the loops below.
const CHUNK: usize = 1 << 14;

/// `out[i] = F(x[i])`, in parallel chunks, vectorised (see `map1`).
pub(super) fn map_into<F: Unary>(x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| map1::<F>(x, o));
}

/// `out[i] = F(a[i], b[i])`, in parallel chunks, vectorised (see `map2`).
pub(super) fn map2_into<F: Binary>(a: &[f32], b: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| map2::<F>(a, b, o));
}

/// `x[i] = F(x[i])` in place (a product's epilogue, on finished pieces of rows), in the
/// AVX2 + FMA compilation where the CPU has it.
#[inline(always)]
pub(super) fn map_in_place<F: Unary>(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide<F: Unary>(x: &mut [f32]) {
            for v in x.iter_mut() {
                *v = F::at(*v);
            }
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { wide::<F>(x) };
    }
    for v in x.iter_mut() {
        *v = F::at(*v);
    }
}

/// `out[i] = F(x[i])`, in the AVX2 + FMA compilation where the CPU has it.
#[inline(always)]
fn map1<F: Unary>(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide<F: Unary>(x: &[f32], out: &mut [f32]) {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = F::at(v);
            }
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { wide::<F>(x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = F::at(v);
    }
}

/// `out[i] = F(a[i], b[i])`, in the AVX2 + FMA compilation where the CPU has it.
#[inline(always)]
fn map2<F: Binary>(a: &[f32], b: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide<F: Binary>(a: &[f32], b: &[f32], out: &mut [f32]) {
            for (o, (&u, &v)) in out.iter_mut().zip(a.iter().zip(b)) {
                *o = F::at(u, v);
            }
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { wide::<F>(a, b, out) };
    }
    for (o, (&u, &v)) in out.iter_mut().zip(a.iter().zip(b)) {
        *o = F::at(u, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_nonpos(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn erfc_matches_f64_over_the_normal_range() {
        // Relative error wherever erfc(z) is a normal f32 (z up to ~9.2), absolute 1e-37
        // past it; the bound is a few f32 ulps, far below any sign or coefficient slip.
        let mut worst = 0f64;
        let mut z = -10.0f32;
        while z <= 9.2 {
            let (got, want) = (erfc(z) as f64, libm::erfc(z as f64));
            worst = worst.max((got - want).abs() / want);
            z += 0.000_73;
        }
        assert!(worst < 1e-6, "worst relative error {worst:e}");
        for z in [9.5f32, 12.0, 40.0, f32::INFINITY] {
            assert!(erfc(z).abs() < 1e-37 && erfc(-z) == 2.0, "erfc(±{z})");
        }
        assert!(erfc(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_and_its_derivative_match_f64() {
        let phi = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let (mut worst, mut worst_grad) = (0f64, 0f64);
        let mut x = -12.0f32;
        while x <= 12.0 {
            let xd = x as f64;
            // Absolute error, scaled by the value where it is large: what the encoder sees.
            let err = |got: f32, want: f64| (got as f64 - want).abs() / want.abs().max(1.0);
            worst = worst.max(err(gelu(x), xd * phi(xd)));
            worst_grad = worst_grad.max(err(gelu_grad(x), phi(xd) + xd * pdf(xd)));
            x += 0.000_91;
        }
        assert!(
            worst < 1e-6 && worst_grad < 1e-6,
            "{worst:e} {worst_grad:e}"
        );
        // The vector loops give the same values as the scalar functions.
        let xs: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 7e-4).collect();
        let dy: Vec<f32> = xs.iter().map(|v| 1.0 - v * 0.01).collect();
        let (mut y, mut dx) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        map_into::<Gelu>(&xs, &mut y);
        map2_into::<GeluBackward>(&dy, &xs, &mut dx);
        let mut inplace = xs.clone();
        map_in_place::<Gelu>(&mut inplace);
        for i in 0..xs.len() {
            assert_eq!(y[i].to_bits(), gelu(xs[i]).to_bits(), "gelu({})", xs[i]);
            assert_eq!(
                inplace[i].to_bits(),
                y[i].to_bits(),
                "in place gelu({})",
                xs[i]
            );
            assert_eq!(dx[i].to_bits(), (dy[i] * gelu_grad(xs[i])).to_bits());
        }
    }
}
