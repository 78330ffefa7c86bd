//! CUDA backend against the CPU reference: every op forward and backward, f32 and bf16,
//! outputs poisoned (NaN-filled) before each kernel runs, on shapes that are not multiples
//! of any tile. Skips with a message where no GPU is present, unless M3_REQUIRE_GPU=1 (the
//! GPU bundle sets it, so a machine without a working GPU fails loudly there).
#![cfg(feature = "cuda")]

mod common;

use m3::backend::cuda::Cuda;
use m3::backend::Backend;
use m3::collective::Solo;
use m3::gradcheck::{cross_check, cross_check_ops, cross_tolerance, CaseDims};
use m3::{DType, HostData};
use proptest::prelude::*;

fn gpu() -> Option<Cuda> {
    if !Cuda::available() {
        if std::env::var_os("M3_REQUIRE_GPU").is_some() {
            panic!("M3_REQUIRE_GPU is set but no CUDA GPU / libcuda / cuBLASLt was found");
        }
        eprintln!("skipping: no CUDA GPU (libcuda, cuBLASLt or a device is missing)");
        return None;
    }
    let dev = Cuda::new(0).expect("open CUDA device 0");
    dev.set_poison(true);
    Some(dev)
}

fn assert_close(dev: &Cuda, dims: CaseDims, dtype: DType, seed: u64) {
    let rows = cross_check(dev, dims, dtype, seed).expect("cross check ran");
    assert!(!rows.is_empty());
    for r in rows {
        assert!(
            r.error <= cross_tolerance(dtype),
            "{} {dtype} {dims:?} seed {seed}: {} relative error {:.3e} > {:.0e}",
            r.name,
            r.worst,
            r.error,
            cross_tolerance(dtype)
        );
    }
}

const FIXED: [CaseDims; 5] = [
    CaseDims {
        rows: 1,
        cols: 1,
        inner: 1,
        vocab: 1,
    },
    CaseDims {
        rows: 17,
        cols: 33,
        inner: 5,
        vocab: 7,
    },
    CaseDims {
        rows: 257,
        cols: 129,
        inner: 65,
        vocab: 300,
    },
    CaseDims {
        rows: 3,
        cols: 1025,
        inner: 19,
        vocab: 2,
    },
    CaseDims {
        rows: 2049,
        cols: 1024,
        inner: 64,
        vocab: 1000,
    },
];

#[test]
fn ops_match_cpu_on_fixed_shapes() {
    // Every shape and op runs before the verdict, so one GPU session sees all failures.
    let Some(dev) = gpu() else { return };
    let mut failures = Vec::new();
    for (i, dims) in FIXED.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let seed = 100 + i as u64;
            for r in cross_check(&dev, *dims, dtype, seed).expect("cross check ran") {
                if r.error > cross_tolerance(dtype) {
                    failures.push(format!(
                        "{} {dtype} {dims:?} seed {seed}: {} relative error {:.3e}",
                        r.name, r.worst, r.error
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ops_match_cpu_at_8192_rows() {
    let Some(dev) = gpu() else { return };
    let dims = CaseDims {
        rows: 8192,
        cols: 64,
        inner: 32,
        vocab: 250,
    };
    assert_close(&dev, dims, DType::BF16, 8192);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn ops_match_cpu_on_random_shapes(
        rows in 1usize..300, cols in 1usize..1100, inner in 1usize..200, vocab in 1usize..500,
        bf16 in any::<bool>(), seed in any::<u64>()
    ) {
        if let Some(dev) = gpu() {
            let dtype = if bf16 { DType::BF16 } else { DType::F32 };
            assert_close(&dev, CaseDims { rows, cols, inner, vocab }, dtype, seed);
        }
    }
}

#[test]
fn variant_flash_kernels_match_cpu() {
    // The kernels that are opt-in until they pass here: the tensor-core backward
    // (flash_bwd.cu) and the ldmatrix forward (flash.cu, LDM), alone and together, on the
    // attention op cases in bf16: fixed shapes, 8192 rows, random shapes.
    let Some(dev) = gpu() else { return };
    let mut dims: Vec<CaseDims> = FIXED.to_vec();
    dims.push(CaseDims {
        rows: 8192,
        cols: 64,
        inner: 32,
        vocab: 250,
    });
    let mut rng = m3::rng::Rng::new(77);
    for _ in 0..8 {
        dims.push(CaseDims {
            rows: 1 + rng.below(700) as usize,
            cols: 1 + rng.below(300) as usize,
            inner: 1 + rng.below(100) as usize,
            vocab: 1 + rng.below(300) as usize,
        });
    }
    let mut failures = Vec::new();
    for (ldm, flash_bwd) in [(false, true), (true, false), (true, true)] {
        dev.set_flash_ldmatrix(ldm);
        dev.set_flash_backward(flash_bwd);
        let mut checked = 0;
        for (i, d) in dims.iter().enumerate() {
            let seed = 500 + i as u64;
            let attention = |n: &str| n.starts_with("attention(");
            let rows = cross_check_ops(&dev, *d, DType::BF16, seed, attention);
            for r in rows.expect("cross check ran") {
                checked += 1;
                if r.error > cross_tolerance(DType::BF16) {
                    failures.push(format!(
                        "ldmatrix fwd {ldm}, flash bwd {flash_bwd}: {} {d:?} seed {seed}: {} {:.3e}",
                        r.name, r.worst, r.error
                    ));
                }
            }
        }
        assert!(
            checked >= 4 * dims.len(),
            "only {checked} attention rows checked"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn variant_maxsim_through_gemms_matches_cpu_and_the_warp_kernel() {
    // The cuBLASLt path of max-sim (opt-in until it passes here): the op cases in f32 and
    // bf16 against the CPU, then a batch big enough for two GEMM chunks (1000 query rows x
    // ~75k passage rows > 64M scores) against the validated one-warp-per-pair kernel.
    use m3::rng::Rng;
    let Some(dev) = gpu() else { return };
    dev.set_maxsim_gemm(true);
    let mut failures = Vec::new();
    let mut checked = 0;
    for (i, d) in FIXED.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let maxsim = |n: &str| n.starts_with("maxsim");
            let rows = cross_check_ops(&dev, *d, dtype, 900 + i as u64, maxsim);
            for r in rows.expect("cross check ran") {
                checked += 1;
                if r.error > cross_tolerance(dtype) {
                    failures.push(format!(
                        "{} {dtype} {d:?}: {} {:.3e}",
                        r.name, r.worst, r.error
                    ));
                }
            }
        }
    }
    assert!(
        checked >= 2 * FIXED.len(),
        "only {checked} max-sim rows checked"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let mut rng = Rng::new(3);
    let d = 16;
    let q_cu: Vec<u32> = (0..=40).map(|b| b * 25).collect();
    let mut p_cu = vec![0u32];
    for _ in 0..300 {
        let len = rng.below(500);
        p_cu.push(p_cu.last().unwrap() + len);
    }
    let (tq, tp) = (1000usize, *p_cu.last().unwrap() as usize);
    assert!(tq * tp > 64 << 20, "the batch must need two chunks");
    let (qh, ph) = (rng.vec(tq * d, -1.0, 1.0), rng.vec(tp * d, -1.0, 1.0));
    let q = dev.upload(HostData::F32(&qh), &[tq, d]).unwrap();
    let p = dev.upload(HostData::F32(&ph), &[tp, d]).unwrap();
    let (s_gemm, arg_gemm) = dev.maxsim(&q, &q_cu, &p, &p_cu).unwrap();
    dev.set_maxsim_gemm(false);
    let (s_warp, _) = dev.maxsim(&q, &q_cu, &p, &p_cu).unwrap();
    let (a, b) = (
        dev.to_vec_f32(&s_gemm).unwrap(),
        dev.to_vec_f32(&s_warp).unwrap(),
    );
    let err = m3::gradcheck::relative_error(&a, &b);
    assert!(err <= 1e-5, "scores through GEMMs off by {err:.3e}");
    // Every arg-max row lies in its passage (NO_ROW exactly for empty passages) and scores
    // the passage's best, recomputed on the host in f64: this checks the second chunk's
    // row offset too.
    let args = dev.to_vec_u32(&arg_gemm).unwrap();
    let dot = |i: usize, j: usize| -> f64 {
        (0..d)
            .map(|c| qh[i * d + c] as f64 * ph[j * d + c] as f64)
            .sum()
    };
    for i in 0..tq {
        for n in 0..300 {
            let (j0, j1) = (p_cu[n], p_cu[n + 1]);
            let a = args[i * 300 + n];
            if j0 == j1 {
                assert_eq!(a, u32::MAX, "row {i} passage {n} is empty");
                continue;
            }
            assert!(
                (j0..j1).contains(&a),
                "row {i} passage {n}: arg {a} outside {j0}..{j1}"
            );
            let best = (j0..j1)
                .map(|j| dot(i, j as usize))
                .fold(f64::NEG_INFINITY, f64::max);
            let got = dot(i, a as usize);
            assert!(
                (best - got).abs() <= 1e-4,
                "row {i} passage {n}: arg {a} scores {got}, the best is {best}"
            );
        }
    }
}

#[test]
fn linear_gelu_matches_the_cpu_composition() {
    linear_gelu_against_cpu(false);
}

#[test]
fn variant_gelu_epilogue_matches_the_cpu_composition() {
    linear_gelu_against_cpu(true);
}

/// gelu(x w + b) on bf16-rounded inputs at an FFN-like shape (257 rows, 256 -> 1024) on the
/// GPU (the composition, or cuBLASLt's GELU_BIAS epilogue: tanh GELU) against the CPU's erf
/// GELU, within bf16's 1e-2.
fn linear_gelu_against_cpu(epilogue: bool) {
    use m3::backend::cpu::Cpu;
    use m3::rng::Rng;
    let Some(dev) = gpu() else { return };
    let (rows, k, n) = (257usize, 256usize, 1024usize);
    let mut rng = Rng::new(11);
    let round = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    let x = round(rng.vec(rows * k, -1.0, 1.0));
    let w = round(rng.vec(k * n, -0.1, 0.1));
    let b = round(rng.vec(n, -0.5, 0.5));
    let up = |v: &[f32], s: &[usize]| {
        let t = dev.upload(HostData::F32(v), s).unwrap();
        dev.cast(&t, DType::BF16).unwrap()
    };
    let (cx, cw, cb) = (
        Cpu.upload(HostData::F32(&x), &[rows, k]).unwrap(),
        Cpu.upload(HostData::F32(&w), &[k, n]).unwrap(),
        Cpu.upload(HostData::F32(&b), &[n]).unwrap(),
    );
    let want = Cpu
        .to_vec_f32(&Cpu.linear_gelu(&cx, &cw, &cb).unwrap())
        .unwrap();
    let (gx, gw, gb) = (up(&x, &[rows, k]), up(&w, &[k, n]), up(&b, &[n]));
    dev.set_gelu_epilogue(epilogue);
    let got = dev
        .to_vec_f32(&dev.linear_gelu(&gx, &gw, &gb).unwrap())
        .unwrap();
    let err = m3::gradcheck::relative_error(&got, &want);
    println!("linear_gelu epilogue {epilogue}: relative error {err:.3e}");
    assert!(err <= 1e-2, "epilogue {epilogue}: relative error {err:.3e}");
}

#[test]
fn poisoned_outputs_are_fully_written() {
    // A poisoned allocation is NaN until written; a kernel that skips an element leaves it.
    let Some(dev) = gpu() else { return };
    let x = dev.upload(HostData::F32(&[1.0; 37]), &[37]).unwrap();
    let fresh = dev.zeros(&[37], DType::F32).unwrap();
    assert!(dev.to_vec_f32(&fresh).unwrap().iter().all(|v| *v == 0.0));
    let y = dev.gelu(&x).unwrap();
    assert!(dev.to_vec_f32(&y).unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn bad_ids_are_rejected_before_launch() {
    let Some(dev) = gpu() else { return };
    let table = dev.upload(HostData::F32(&[0.0; 6]), &[3, 2]).unwrap();
    let ids = dev.upload(HostData::U32(&[0, 3]), &[2]).unwrap();
    let err = dev.embedding(&table, &ids).unwrap_err().to_string();
    assert!(err.contains("id 3"), "{err}");
}

/// The fixtures folder: M3_FIXTURES (the GPU bundle sets it), else the source tree's.
fn fixtures() -> std::path::PathBuf {
    std::env::var_os("M3_FIXTURES")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
}

#[test]
fn whole_encoder_on_the_fixture_model_matches_cpu() {
    whole_encoder_against_cpu(false);
}

#[test]
fn variant_kernels_in_the_whole_encoder_match_cpu() {
    whole_encoder_against_cpu(true);
}

/// The fixture model's three outputs on the GPU (f32 tightly, then bf16 at issue 5's
/// bounds) against the CPU's, with the opt-in kernel variants on or off.
fn whole_encoder_against_cpu(variants: bool) {
    use m3::backend::cpu::Cpu;
    use m3::model::embedder::{Embedder, EncodeOptions};
    let Some(dev) = gpu() else { return };
    dev.set_gelu_epilogue(variants);
    dev.set_flash_ldmatrix(variants);
    let dir = fixtures().join("tiny-m3");
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-m3-golden.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = golden["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    let opts = EncodeOptions {
        colbert: true,
        batch_tokens: 200,
        ..EncodeOptions::default()
    };
    let cpu = Embedder::load(&Cpu, &dir, DType::F32)
        .unwrap()
        .encode(&Cpu, &texts, &opts, &mut |_| {})
        .unwrap();
    let on_gpu = |dtype| {
        Embedder::load(&dev, &dir, dtype)
            .unwrap()
            .encode(&dev, &texts, &opts, &mut |_| {})
            .unwrap()
    };
    let cos = |a: &[f32], b: &[f32]| {
        let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        d / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
            * b.iter().map(|x| x * x).sum::<f32>().sqrt())
    };
    let lookup = |l: &[(u32, f32)], id: u32| l.iter().find(|p| p.0 == id).map_or(0.0, |p| p.1);
    // f32 on the GPU computes what the CPU computes: tight, element by element.
    let f32_run = on_gpu(DType::F32);
    for (i, (c, g)) in cpu.embeddings.iter().zip(&f32_run.embeddings).enumerate() {
        let dc = cos(c.dense.as_ref().unwrap(), g.dense.as_ref().unwrap());
        assert!(dc >= 0.99999, "f32 text {i}: dense cosine {dc}");
        let (cl, gl) = (c.lexical.as_ref().unwrap(), g.lexical.as_ref().unwrap());
        for &(id, _) in cl.iter().chain(gl) {
            let (a, b) = (lookup(cl, id), lookup(gl, id));
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(b.abs()) + 1e-5,
                "f32 text {i} token {id}: {a} vs {b}"
            );
        }
        let (cc, gc) = (c.colbert.as_ref().unwrap(), g.colbert.as_ref().unwrap());
        assert_eq!(cc.len(), gc.len());
        for (a, b) in cc.iter().zip(gc) {
            assert!(
                cos(a, b) >= 0.99999,
                "f32 text {i}: colbert cosine {}",
                cos(a, b)
            );
        }
    }
    // bf16 (the inference default on a GPU): issue 5's bounds. A lexical weight is
    // relu(w·h + b), where w·h and b can nearly cancel, so one weight alone can move by more
    // than 1e-2 of itself under bf16 rounding of h; the bound is on each text's weight
    // vector (norm-wise) and on the matrix of lexical scores between texts.
    // With the variants: the GELU epilogue and the ldmatrix attention forward.
    {
        let label = if variants {
            "opt-in variants"
        } else {
            "default"
        };
        let bf16_run = on_gpu(DType::BF16);
        let mut worst_vec = 0f64;
        let score = |a: &[(u32, f32)], b: &[(u32, f32)]| -> f32 {
            a.iter().map(|&(id, w)| w * lookup(b, id)).sum()
        };
        let (mut want_scores, mut got_scores) = (Vec::new(), Vec::new());
        for (i, (c, g)) in cpu.embeddings.iter().zip(&bf16_run.embeddings).enumerate() {
            let dc = cos(c.dense.as_ref().unwrap(), g.dense.as_ref().unwrap());
            assert!(dc >= 0.999, "bf16 ({label}) text {i}: dense cosine {dc}");
            let (cl, gl) = (c.lexical.as_ref().unwrap(), g.lexical.as_ref().unwrap());
            let ids: Vec<u32> = cl.iter().chain(gl).map(|p| p.0).collect();
            let want: Vec<f32> = ids.iter().map(|&id| lookup(cl, id)).collect();
            let got: Vec<f32> = ids.iter().map(|&id| lookup(gl, id)).collect();
            worst_vec = worst_vec.max(m3::gradcheck::relative_error(&got, &want));
            for (c2, g2) in cpu.embeddings.iter().zip(&bf16_run.embeddings) {
                want_scores.push(score(cl, c2.lexical.as_ref().unwrap()));
                got_scores.push(score(gl, g2.lexical.as_ref().unwrap()));
            }
            let (cc, gc) = (c.colbert.as_ref().unwrap(), g.colbert.as_ref().unwrap());
            assert_eq!(cc.len(), gc.len());
            for (a, b) in cc.iter().zip(gc) {
                assert!(
                    cos(a, b) >= 0.999,
                    "bf16 ({label}) text {i}: colbert cosine {}",
                    cos(a, b)
                );
            }
        }
        // The score matrix norm-wise, like the weights: a pair sharing one low-weight token has
        // a score that is one product of two bf16-perturbed weights (such a score was seen
        // 2.8e-2 off on its own, H100, 2026-11-27; printed below as the worst single score).
        let score_err = m3::gradcheck::relative_error(&got_scores, &want_scores);
        let worst_single = got_scores
            .iter()
            .zip(&want_scores)
            .map(|(g, w)| ((g - w).abs() / w.abs().max(1e-3)) as f64)
            .fold(0f64, f64::max);
        println!(
            "bf16 ({label}) lexical: worst weight-vector error {worst_vec:.3e}, score matrix {score_err:.3e}, \
             worst single score {worst_single:.3e}"
        );
        assert!(
            worst_vec <= 1e-2,
            "bf16 ({label}) lexical weight vectors off by {worst_vec:.3e}"
        );
        assert!(
            score_err <= 1e-2,
            "bf16 ({label}) lexical score matrix off by {score_err:.3e}"
        );
    }
}

/// A training step on the GPU waits for it no more often than the CPU count allows
/// (tests/train.rs): the id checks, attention offsets, sums' backward, loss parts and
/// sub-batch gradients stay on the device; f32 and bf16 compute.
#[test]
fn a_training_step_on_the_gpu_makes_a_bounded_number_of_host_syncs() {
    let Some(dev) = gpu() else { return };
    for dtype in [DType::F32, DType::BF16] {
        for c in common::steps::step_host_syncs(&dev, &fixtures().join("tiny-m3"), dtype) {
            println!("{dtype} {c:?}");
            c.assert_bounded(&format!("cuda {dtype}"));
        }
    }
}

#[test]
fn training_on_the_gpu_follows_the_cpu_loss_curve() {
    // Issue 6's check: every f32 step's loss within 1% of the CPU's.
    let Some((cpu, gpu)) = training_curves(DType::F32) else {
        return;
    };
    for (k, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        assert!(
            (c - g).abs() <= 0.01 * c.abs(),
            "step {}: GPU loss {g} vs CPU {c}",
            k + 1
        );
    }
}

#[test]
fn variant_bf16_training_follows_the_cpu_loss_curve() {
    // bf16 compute (f32 masters and loss): the same curve within 5% or 0.02, a bound set
    // before this ran, from bf16's 2^-8 rounding of every activation over 20 steps.
    let Some((cpu, gpu)) = training_curves(DType::BF16) else {
        return;
    };
    for (k, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        assert!(
            (c - g).abs() <= 0.05 * c.abs() + 0.02,
            "step {}: GPU bf16 loss {g} vs CPU {c}",
            k + 1
        );
    }
}

/// The fixture model trained 20 steps (dropout 0, sub-batches of 2) on the CPU and on the
/// GPU with `dtype` compute: both loss curves, or None without a GPU.
fn training_curves(dtype: DType) -> Option<(Vec<f32>, Vec<f32>)> {
    use m3::backend::cpu::Cpu;
    use m3::train::options::TrainOptions;
    use m3::train::trainer::Trainer;
    let dev = gpu()?;
    let dir = std::env::temp_dir().join(format!("m3-gpu-train-{}-{dtype}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("train.jsonl");
    let texts = [
        (
            "What is the capital of France?",
            "Paris is the capital of France.",
        ),
        (
            "Der schnelle braune Fuchs",
            "The quick brown fox jumps over the lazy dog.",
        ),
        (
            "Быстрая лиса",
            "Быстрая коричневая лиса прыгает через собаку.",
        ),
        ("狐狸", "敏捷的棕色狐狸跳过了懒狗。"),
    ];
    let mut lines = String::new();
    for (i, (q, p)) in texts.iter().enumerate() {
        let neg = texts[(i + 1) % texts.len()].1;
        lines.push_str(&format!(
            "{}\n",
            serde_json::json!({"query": q, "pos": [p], "neg": [neg]})
        ));
    }
    std::fs::write(&data, lines).unwrap();
    let opts = |out: &str| {
        let mut o = TrainOptions::new(
            fixtures().join("tiny-m3"),
            vec![data.clone()],
            dir.join(out),
        );
        o.batch_size = 2;
        o.group = 2;
        o.temperature = 0.05;
        o.adamw.lr = 1e-3;
        o.max_steps = Some(20);
        o.dropout = Some(0.0);
        o.sub_batch = Some(2);
        o
    };
    fn curve<B: Backend>(mut t: Trainer<'_, B>) -> Vec<f32> {
        let mut v = Vec::new();
        while !t.finished() {
            v.push(t.step().unwrap().loss.loss);
        }
        v
    }
    let cpu = curve(Trainer::new(&Cpu, opts("cpu"), DType::F32, false, &Solo).unwrap());
    let gpu = curve(Trainer::new(&dev, opts("gpu"), dtype, false, &Solo).unwrap());
    println!("cpu {cpu:?}\ngpu ({dtype}) {gpu:?}");
    assert!(cpu.len() == 20 && gpu.len() == cpu.len());
    std::fs::remove_dir_all(&dir).unwrap();
    Some((cpu, gpu))
}

#[test]
fn fused_layernorms_match_the_cpu_composition() {
    // add_layernorm and embed_layernorm (fused on CUDA) against the CPU's add / gather +
    // layernorm, on inputs rounded to bf16 first so both sides see the same values.
    use m3::backend::cpu::Cpu;
    use m3::rng::Rng;
    let Some(dev) = gpu() else { return };
    let round = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    for dtype in [DType::F32, DType::BF16] {
        // 256, 768 and 1024 columns take the vectorised bf16 add_layernorm.
        for (rows, cols, vocab) in [
            (1usize, 32usize, 5u32),
            (17, 1024, 300),
            (33, 768, 50),
            (3, 256, 7),
            (2049, 64, 1000),
        ] {
            let mut rng = Rng::new(rows as u64);
            let mut r = |n: usize, lo: f32, hi: f32| round(rng.vec(n, lo, hi));
            let (a, b) = (r(rows * cols, -2.0, 2.0), r(rows * cols, -2.0, 2.0));
            let (g, be) = (r(cols, 0.5, 1.5), r(cols, -0.5, 0.5));
            let word = r(vocab as usize * cols, -1.0, 1.0);
            let pos = r(64 * cols, -1.0, 1.0);
            let ty = r(cols, -1.0, 1.0);
            let mut rng = Rng::new(9);
            let ids: Vec<u32> = (0..rows).map(|_| rng.below(vocab)).collect();
            let positions: Vec<u32> = (0..rows).map(|_| rng.below(64)).collect();
            fn run<B: Backend>(
                be_: &B,
                dtype: DType,
                t: &[(&[f32], Vec<usize>)],
                ids: &[u32],
                positions: &[u32],
            ) -> (Vec<f32>, Vec<f32>) {
                let up = |(v, s): &(&[f32], Vec<usize>)| {
                    be_.cast(&be_.upload(HostData::F32(v), s).unwrap(), dtype)
                        .unwrap()
                };
                let [a, b, g, beta, word, pos, ty] = [0, 1, 2, 3, 4, 5, 6].map(|i| up(&t[i]));
                let ids = be_.upload(HostData::U32(ids), &[ids.len()]).unwrap();
                let positions = be_
                    .upload(HostData::U32(positions), &[positions.len()])
                    .unwrap();
                let y1 = be_.add_layernorm(&a, &b, &g, &beta, 1e-5).unwrap();
                let y2 = be_
                    .embed_layernorm(&word, &pos, &ty, &ids, &positions, &g, &beta, 1e-5)
                    .unwrap();
                (be_.to_vec_f32(&y1).unwrap(), be_.to_vec_f32(&y2).unwrap())
            }
            let tensors: Vec<(&[f32], Vec<usize>)> = vec![
                (&a, vec![rows, cols]),
                (&b, vec![rows, cols]),
                (&g, vec![cols]),
                (&be, vec![cols]),
                (&word, vec![vocab as usize, cols]),
                (&pos, vec![64, cols]),
                (&ty, vec![1, cols]),
            ];
            let want = run(&Cpu, DType::F32, &tensors, &ids, &positions);
            let got = run(&dev, dtype, &tensors, &ids, &positions);
            for (name, w, gv) in [
                ("add_layernorm", &want.0, &got.0),
                ("embed_layernorm", &want.1, &got.1),
            ] {
                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
                let worst = w
                    .iter()
                    .zip(gv)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst as f64 <= cross_tolerance(dtype) * scale as f64,
                    "{name} {dtype} {rows}x{cols}: off by {worst} (scale {scale})"
                );
            }
        }
    }
}

#[test]
fn arena_ops_at_offsets_match_the_cpu() {
    use m3::backend::cpu::Cpu;
    use m3::backend::AdamWStep;
    use m3::rng::Rng;
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(11);
    let len = 1000;
    let flat = rng.vec(len, -1.0, 1.0);
    let part = rng.vec(301, -1.0, 1.0);
    let s = AdamWStep {
        grad_scale: 0.7,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step_size: 1e-3,
        bc2_sqrt: 0.05,
        decay: 1e-4,
    };
    // Odd offsets on purpose: slots are aligned in practice, the ops must not depend on it.
    for off in [0usize, 3, 64, 699] {
        let (mut c, mut d) = (
            Cpu.upload(HostData::F32(&flat), &[len]).unwrap(),
            dev.upload(HostData::F32(&flat), &[len]).unwrap(),
        );
        let (cp, dp) = (
            Cpu.upload(HostData::F32(&part), &[301]).unwrap(),
            dev.upload(HostData::F32(&part), &[301]).unwrap(),
        );
        Cpu.add_at(&mut c, off, &cp).unwrap();
        dev.add_at(&mut d, off, &dp).unwrap();
        assert_eq!(
            Cpu.to_vec_f32(&c).unwrap(),
            dev.to_vec_f32(&d).unwrap(),
            "add_at {off}"
        );
        for dtype in [DType::F32, DType::BF16] {
            let mut dd = dev.zeros(&[301], dtype).unwrap();
            dev.read_at(&d, off, &mut dd).unwrap();
            let want: Vec<f32> = Cpu.to_vec_f32(&c).unwrap()[off..off + 301]
                .iter()
                .map(|&x| {
                    if dtype == DType::BF16 {
                        half::bf16::from_f32(x).to_f32()
                    } else {
                        x
                    }
                })
                .collect();
            assert_eq!(dev.to_vec_f32(&dd).unwrap(), want, "read_at {off} {dtype}");
        }
        let mv = |k: u64| rng_vec(k, len);
        let (m0, v0, g0) = (
            mv(1),
            mv(2).iter().map(|x| x.abs()).collect::<Vec<_>>(),
            mv(3),
        );
        let mut ct: Vec<_> = [&flat, &g0, &m0, &v0]
            .iter()
            .map(|x| Cpu.upload(HostData::F32(x), &[len]).unwrap())
            .collect();
        let mut dt: Vec<_> = [&flat, &g0, &m0, &v0]
            .iter()
            .map(|x| dev.upload(HostData::F32(x), &[len]).unwrap())
            .collect();
        let r = off..off + 301;
        {
            let [p, g, m, v] = &mut ct[..] else {
                unreachable!()
            };
            Cpu.adamw(p, r.start, g, m, v, r.clone(), &s).unwrap();
        }
        {
            let [p, g, m, v] = &mut dt[..] else {
                unreachable!()
            };
            dev.adamw(p, r.start, g, m, v, r.clone(), &s).unwrap();
        }
        for (k, name) in [(0, "p"), (2, "m"), (3, "v")] {
            let (want, got) = (
                Cpu.to_vec_f32(&ct[k]).unwrap(),
                dev.to_vec_f32(&dt[k]).unwrap(),
            );
            // Outside the range nothing moved, inside it matches like the full-range test.
            assert_eq!(want[..off], got[..off], "adamw {name} before {off}");
            assert_eq!(want[r.end..], got[r.end..], "adamw {name} after {off}");
            let err = m3::gradcheck::relative_error(&got[r.clone()], &want[r.clone()]);
            assert!(
                err <= 1e-5,
                "adamw {name} at {off}: relative error {err:.3e}"
            );
        }
    }
}

fn rng_vec(seed: u64, n: usize) -> Vec<f32> {
    m3::rng::Rng::new(seed).vec(n, -0.1, 0.1)
}

#[test]
fn adamw_and_sum_of_squares_match_the_host_reference() {
    use m3::backend::{adamw_host, sum_squares_host, AdamWStep};
    use m3::rng::Rng;
    let Some(dev) = gpu() else { return };
    for n in [1usize, 17, 257, 100_003] {
        let mut rng = Rng::new(n as u64);
        let (p, g) = (rng.vec(n, -1.0, 1.0), rng.vec(n, -0.1, 0.1));
        let (m, v) = (rng.vec(n, -0.01, 0.01), rng.vec(n, 0.0, 0.001));
        let s = AdamWStep {
            grad_scale: 0.5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step_size: 1e-3,
            bc2_sqrt: 0.05,
            decay: 1e-5,
        };
        let (mut hp, mut hm, mut hv) = (p.clone(), m.clone(), v.clone());
        adamw_host(&mut hp, &g, &mut hm, &mut hv, &s);
        let up = |x: &[f32]| dev.upload(HostData::F32(x), &[n]).unwrap();
        let (mut dp, dg, mut dm, mut dv) = (up(&p), up(&g), up(&m), up(&v));
        dev.adamw(&mut dp, 0, &dg, &mut dm, &mut dv, 0..n, &s)
            .unwrap();
        for (name, want, got) in [("p", &hp, &dp), ("m", &hm, &dm), ("v", &hv, &dv)] {
            // Norm-wise like every other cross-check: an element of m near zero by
            // cancellation has no meaningful relative error of its own (the kernel's fma
            // rounds once where the host rounds twice).
            let got = dev.to_vec_f32(got).unwrap();
            let err = m3::gradcheck::relative_error(&got, want);
            assert!(err <= 1e-5, "adamw {name} n={n}: relative error {err:.3e}");
        }
        let want = sum_squares_host(&g);
        let got = dev.sum_squares(&dg).unwrap();
        assert!(
            (want - got).abs() <= 1e-9 * want,
            "sum_squares n={n}: {got} vs {want}"
        );
    }
}
