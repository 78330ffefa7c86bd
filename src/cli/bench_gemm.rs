//! `m3 bench gemm`: the CPU's f32 FMA peak and each matrix-product implementation's
//! GFLOP/s on the encoder's shapes, as a fraction of that peak (issue 14's measure); m3's
//! kernels also with the right operand packed beforehand, as inference's weights are.

use super::out::outln;

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use m3::backend::cpu::linalg::{gemm_impls, gemm_rhs, gemm_using, GemmImpl, Rhs, View};
use m3::backend::cpu::sgemm::kernels;
use rayon::prelude::*;
use serde_json::json;

/// `m3 bench gemm` flags.
#[derive(Args, Debug)]
pub struct GemmBenchArgs {
    /// Products as `MxKxN` (left `[M, K]` times right `[K, N]`), comma-separated; default:
    /// the encoder's projections (hidden 1024, FFN 4096) at 256 and 2048 tokens.
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Timed runs per shape and implementation after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
}

/// The default shapes: Q/K/V/output projections, FFN up and down, at two batch sizes.
const DEFAULT_SHAPES: [(usize, usize, usize); 6] = [
    (256, 1024, 1024),
    (256, 1024, 4096),
    (256, 4096, 1024),
    (2048, 1024, 1024),
    (2048, 1024, 4096),
    (2048, 4096, 1024),
];

fn parse_shape(s: &str) -> anyhow::Result<(usize, usize, usize)> {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--shapes: {s:?} is not MxKxN (e.g. 2048x1024x4096)"))?;
    match dims[..] {
        [m, k, n] if m > 0 && k > 0 && n > 0 => Ok((m, k, n)),
        _ => anyhow::bail!("--shapes: {s:?} is not MxKxN with positive sizes"),
    }
}

/// Median seconds of `repeat` runs of `once` after one warm-up.
fn time(repeat: usize, once: &mut dyn FnMut() -> f64) -> f64 {
    once();
    median((0..repeat).map(|_| once()).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark, one JSON line per measurement on stdout.
pub fn run(a: GemmBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.repeat > 0, "--repeat must be at least 1");
    let shapes = if a.shapes.is_empty() {
        DEFAULT_SHAPES.to_vec()
    } else {
        a.shapes
            .iter()
            .map(|s| parse_shape(s))
            .collect::<anyhow::Result<_>>()?
    };
    let threads = rayon::current_num_threads();
    // The peak: every thread runs the widest kernel's FMA loop at once.
    let mut peak = None;
    if let Some(kern) = kernels().first() {
        let iters = 20_000_000;
        let mut runs = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            let s: f32 = (0..threads)
                .into_par_iter()
                .map(|_| kern.fma_peak(iters))
                .sum();
            std::hint::black_box(s);
            runs.push(
                kern.fma_peak_flops(iters) * threads as f64 / t0.elapsed().as_secs_f64() / 1e9,
            );
        }
        // The best run, not the median: a neighbour on a shared machine only ever slows
        // the loop down, and this is the ceiling the products are measured against.
        let gflops = runs.iter().copied().fold(0.0, f64::max);
        peak = Some(gflops);
        outln!(
            "{}",
            json!({"impl": format!("fma-peak-{}", kern.name), "threads": threads, "gflops": gflops})
        )?;
    }
    let mut rng = m3::rng::Rng::new(1);
    for (m, k, n) in shapes {
        let av = rng.vec(m * k, -1.0, 1.0);
        let bv = rng.vec(k * n, -1.0, 1.0);
        let mut c = vec![0.0f32; m * n];
        let report = |name: String, secs: f64| {
            let gflops = 2.0 * (m * k * n) as f64 / secs / 1e9;
            outln!(
                "{}",
                json!({"impl": name, "m": m, "k": k, "n": n, "threads": threads,
                       "ms": secs * 1e3, "gflops": gflops,
                       "peak_fraction": peak.map(|p| gflops / p)})
            )
        };
        let (a_view, b_view) = (View::rows(&av, m, k), View::rows(&bv, k, n));
        for imp in gemm_impls() {
            let mut once = || {
                let t0 = Instant::now();
                gemm_using(imp, &mut c, n, a_view, b_view, 1.0, false, threads);
                t0.elapsed().as_secs_f64()
            };
            report(imp.name().to_string(), time(a.repeat, &mut once))?;
            // The same product with the right operand packed beforehand, as a weight
            // packed once at load would be: what per-call packing costs.
            if let GemmImpl::Packed(_) = imp {
                let rhs = Rhs::with(imp, b_view);
                let mut once = || {
                    let t0 = Instant::now();
                    gemm_rhs(&mut c, n, a_view, &rhs, 1.0, false, threads);
                    t0.elapsed().as_secs_f64()
                };
                report(
                    format!("{}-prepacked", imp.name()),
                    time(a.repeat, &mut once),
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
