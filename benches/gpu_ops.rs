//! GPU op benchmarks: achieved TFLOP/s (matmul) or GB/s (memory-bound kernels) on
//! BGE-M3-sized shapes, timed with device events after warm-up, median of 50 runs (5 for
//! ops over 20 ms), on random data. Prints a table; skips with a message where no GPU is
//! present.

use m3::backend::cuda::Cuda;
use m3::backend::Backend;
use m3::rng::Rng;
use m3::{DType, HostData, Tensor};

type R<T> = m3::Result<T>;

fn rand(dev: &Cuda, rng: &mut Rng, shape: &[usize], dtype: DType) -> R<Tensor<Cuda>> {
    let n = shape.iter().product();
    let t = dev.upload(HostData::F32(&rng.vec(n, -1.0, 1.0)), shape)?;
    dev.cast(&t, dtype)
}

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(f32::total_cmp);
    v[v.len() / 2] as f64
}

struct Row {
    name: String,
    ms: f64,
    rate: String,
}

fn bench(dev: &Cuda, name: &str, flops: f64, bytes: f64, mut f: impl FnMut() -> R<()>) -> R<Row> {
    // One probe run sizes the repeats: 50 for fast ops, 5 for ones over 20 ms (max-sim
    // against 10k passages), so the whole table fits a short device call.
    let probe = median(dev.time_ms(1, 1, &mut f)?);
    let iters = if probe > 20.0 { 5 } else { 50 };
    let ms = median(dev.time_ms(2, iters, f)?);
    let rate = if flops > 0.0 {
        format!("{:.1} TFLOP/s", flops / ms / 1e9)
    } else {
        format!("{:.0} GB/s", bytes / ms / 1e6)
    };
    Ok(Row {
        name: name.to_string(),
        ms,
        rate,
    })
}

fn run(dev: &Cuda) -> R<Vec<Row>> {
    let mut rng = Rng::new(1);
    let bf = DType::BF16;
    let mut rows = Vec::new();
    // Linear layers of BGE-M3 over a 16k-token packed batch.
    let t = 16384;
    for (n, k) in [(1024, 1024), (4096, 1024), (1024, 4096)] {
        let x = rand(dev, &mut rng, &[t, k], bf)?;
        let w = rand(dev, &mut rng, &[n, k], bf)?;
        let b = rand(dev, &mut rng, &[n], bf)?;
        let flops = 2.0 * (t * n * k) as f64;
        rows.push(bench(
            dev,
            &format!("linear bf16 {t}x{k} -> {n} +bias"),
            flops,
            0.0,
            || dev.matmul(&x, false, &w, true, Some(&b), bf).map(drop),
        )?);
        // Weight gradient dW = dYᵀ X into f32.
        let dy = rand(dev, &mut rng, &[t, n], bf)?;
        rows.push(bench(
            dev,
            &format!("dW bf16->f32 {n}x{k} over {t}"),
            flops,
            0.0,
            || dev.matmul(&dy, true, &x, false, None, DType::F32).map(drop),
        )?);
    }
    // The FFN up-projection with its GELU: GEMM then the GELU kernel, and cuBLASLt's
    // GELU_BIAS epilogue (opt-in).
    {
        let x = rand(dev, &mut rng, &[t, 1024], bf)?;
        let w = rand(dev, &mut rng, &[1024, 4096], bf)?;
        let b = rand(dev, &mut rng, &[4096], bf)?;
        for epilogue in [false, true] {
            dev.set_gelu_epilogue(epilogue);
            rows.push(bench(
                dev,
                &format!(
                    "linear+gelu bf16 {t}x1024 -> 4096 ({})",
                    if epilogue {
                        "epilogue"
                    } else {
                        "GEMM, GELU kernel"
                    }
                ),
                2.0 * (t * 1024 * 4096) as f64,
                0.0,
                || dev.linear_gelu(&x, &w, &b).map(drop),
            )?);
        }
        dev.set_gelu_epilogue(false);
    }
    let x = rand(dev, &mut rng, &[t, 1024], bf)?;
    let g = rand(dev, &mut rng, &[1024], bf)?;
    let b = rand(dev, &mut rng, &[1024], bf)?;
    let bytes = (t * 1024 * 2 * 2) as f64;
    rows.push(bench(
        dev,
        "layernorm fwd bf16 16384x1024",
        0.0,
        bytes,
        || dev.layernorm(&x, &g, &b, 1e-5).map(drop),
    )?);
    let ln = dev.layernorm(&x, &g, &b, 1e-5)?;
    rows.push(bench(
        dev,
        "layernorm bwd bf16 16384x1024",
        0.0,
        bytes * 1.5,
        || {
            dev.layernorm_backward(&x, &x, &g, &ln.mean, &ln.rstd)
                .map(drop)
        },
    )?);
    let h = rand(dev, &mut rng, &[t, 4096], bf)?;
    let hb = (t * 4096 * 2 * 2) as f64;
    rows.push(bench(dev, "gelu fwd bf16 16384x4096", 0.0, hb, || {
        dev.gelu(&h).map(drop)
    })?);
    rows.push(bench(
        dev,
        "gelu bwd bf16 16384x4096",
        0.0,
        hb * 1.5,
        || dev.gelu_backward(&h, &h).map(drop),
    )?);
    rows.push(bench(dev, "add bf16 16384x1024", 0.0, bytes * 1.5, || {
        dev.add(&x, &x).map(drop)
    })?);
    let table = rand(dev, &mut rng, &[250_002, 1024], bf)?;
    let ids: Vec<u32> = (0..t).map(|_| rng.below(250_002)).collect();
    let ids = dev.upload(HostData::U32(&ids), &[t])?;
    rows.push(bench(
        dev,
        "embedding gather bf16 16384 of 250002x1024",
        0.0,
        bytes,
        || dev.embedding(&table, &ids).map(drop),
    )?);
    let logits = rand(dev, &mut rng, &[128, 1024], DType::F32)?;
    let targets: Vec<u32> = (0..128).map(|i| i * 8).collect();
    let targets = dev.upload(HostData::U32(&targets), &[128])?;
    rows.push(bench(
        dev,
        "softmax CE fwd f32 128x1024 (incl. id check)",
        0.0,
        (128 * 1024 * 4) as f64,
        || dev.softmax_cross_entropy(&logits, &targets).map(drop),
    )?);
    // Attention forward as issue 5 sizes it: 16k tokens per batch in sequences of 512 to
    // 8192, 16 heads of dim 64, bf16 (the tensor-core kernel); 4·T·L·d·heads FLOPs.
    for l in [512usize, 2048, 8192] {
        let (heads, d) = (16usize, 64usize);
        // Made once per batch, as the encoder does: not part of any timed call.
        let offsets: Vec<u32> = (0..=t / l).map(|i| (i * l) as u32).collect();
        let cu = m3::backend::Seqs::new(dev, &offsets)?;
        let q = rand(dev, &mut rng, &[t, heads * d], bf)?;
        let k = rand(dev, &mut rng, &[t, heads * d], bf)?;
        let v = rand(dev, &mut rng, &[t, heads * d], bf)?;
        let flops = 4.0 * (t * l * d * heads) as f64;
        for ldm in [false, true] {
            dev.set_flash_ldmatrix(ldm);
            rows.push(bench(
                dev,
                &format!(
                    "attention fwd bf16 {t} tokens, seq {l}, 16x64{}",
                    if ldm { " (ldmatrix)" } else { "" }
                ),
                flops,
                0.0,
                || dev.attention(&q, &k, &v, &cu, heads, 0.125).map(drop),
            )?);
        }
        dev.set_flash_ldmatrix(false);
        // Backward, 2.5x the forward's FLOPs (FlashAttention's and bench_sdpa.py's count):
        // the tensor-core kernels (flash_bwd.cu), then the naive ones at 512 only.
        let (out, lse) = dev.attention(&q, &k, &v, &cu, heads, 0.125)?;
        let dout = rand(dev, &mut rng, &[t, heads * d], bf)?;
        let kinds: &[bool] = if l == 512 { &[true, false] } else { &[true] };
        for &flash in kinds {
            dev.set_flash_backward(flash);
            rows.push(bench(
                dev,
                &format!(
                    "attention bwd bf16 {} seq {l}, 16x64",
                    if flash { "flash" } else { "naive" }
                ),
                2.5 * flops,
                0.0,
                || {
                    dev.attention_backward(&dout, &q, &k, &v, &out, &lse, &cu, heads, 0.125)
                        .map(drop)
                },
            )?);
        }
        dev.set_flash_backward(false);
    }
    // Max-sim as issue 5 sizes it: 32-token queries against 10k passages of 256 tokens at
    // dim 1024 (here 8 queries; the kernel is a naive warp-per-row baseline).
    let (nq, lq, np, lp, d) = (8usize, 32usize, 10_000usize, 256usize, 1024usize);
    let qv = rand(dev, &mut rng, &[nq * lq, d], bf)?;
    let pv = rand(dev, &mut rng, &[np * lp, d], bf)?;
    let q_cu: Vec<u32> = (0..=nq).map(|i| (i * lq) as u32).collect();
    let p_cu: Vec<u32> = (0..=np).map(|i| (i * lp) as u32).collect();
    let flops = 2.0 * (nq * lq * np * lp * d) as f64;
    for gemm in [false, true] {
        dev.set_maxsim_gemm(gemm);
        rows.push(bench(
            dev,
            &format!(
                "maxsim bf16 {nq}x{lq} vs {np}x{lp} d{d}{}",
                if gemm { " (GEMM)" } else { "" }
            ),
            flops,
            0.0,
            || dev.maxsim(&qv, &q_cu, &pv, &p_cu).map(drop),
        )?);
    }
    dev.set_maxsim_gemm(false);
    // Lexical scores of a training batch: 16 queries of 64 tokens against 128 passages of
    // 512 tokens, ids from BGE-M3's vocabulary (host grouping by id included).
    let (bq, bp) = (16usize, 128usize);
    let side = |rng: &mut Rng, n: usize, len: usize| -> R<(Tensor<Cuda>, Vec<u32>, Vec<u32>)> {
        let w = dev.upload(HostData::F32(&rng.vec(n * len, 0.0, 2.0)), &[n * len])?;
        let ids = (0..n * len).map(|_| rng.below(30_000)).collect();
        let cu = (0..=n).map(|i| (i * len) as u32).collect();
        Ok((w, ids, cu))
    };
    let (qw, qi, qc) = side(&mut rng, bq, 64)?;
    let (pw, pi, pc) = side(&mut rng, bp, 512)?;
    let excluded = [0u32, 1, 2, 3];
    let lq_side = m3::backend::LexicalSide {
        weights: &qw,
        ids: &qi,
        cu: &qc,
        excluded: &excluded,
    };
    let lp_side = m3::backend::LexicalSide {
        weights: &pw,
        ids: &pi,
        cu: &pc,
        excluded: &excluded,
    };
    rows.push(bench(
        dev,
        &format!("lexical scores {bq}x64 vs {bp}x512 (incl. host grouping)"),
        0.0,
        ((bq * 64 + bp * 512) * 8) as f64,
        || dev.lexical_scores(&lq_side, &lp_side).map(drop),
    )?);
    Ok(rows)
}

fn main() {
    if !Cuda::available() {
        eprintln!(
            "skipping GPU benchmarks: no CUDA GPU (libcuda, cuBLASLt or a device is missing)"
        );
        if std::env::var_os("M3_REQUIRE_GPU").is_some() {
            std::process::exit(1);
        }
        return;
    }
    let dev = Cuda::new(0).expect("open CUDA device 0");
    println!("device: {}", dev.name());
    match run(&dev) {
        Ok(rows) => {
            println!("{:<48} {:>10} {:>16}", "op", "median ms", "rate");
            for r in rows {
                println!("{:<48} {:>10.4} {:>16}", r.name, r.ms, r.rate);
            }
        }
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
