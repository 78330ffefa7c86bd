//! The trainer on the fixture model: the loss goes down, checkpoints load for encoding,
//! `--resume` continues bit-identically, sub-batches give the unsplit gradient, and a
//! non-finite loss stops training naming the step.

mod common;

use common::tmp;

use std::path::{Path, PathBuf};

use m3::backend::cpu::Cpu;
use m3::collective::Solo;
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::train::arena::{GradArena, ParamLayout};
use m3::train::forward::{step_grads, RankLoss, StepDropout};
use m3::train::model::TrainModel;
use m3::train::optim::AdamW;
use m3::train::options::TrainOptions;
use m3::train::trainer::{run_training, Silent, Trainer};
use m3::DType;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3")
}

/// Eight multilingual records, each with a positive and three negatives.
fn write_data(dir: &Path) -> PathBuf {
    let topics = [
        (
            "What is the capital of France?",
            "Paris is the capital of France.",
        ),
        (
            "Der schnelle braune Fuchs",
            "The quick brown fox jumps over the lazy dog.",
        ),
        (
            "Быстрая коричневая лиса",
            "Быстрая коричневая лиса прыгает через собаку.",
        ),
        ("狐狸", "敏捷的棕色狐狸跳过了懒狗。"),
        (
            "How tall is Mount Everest?",
            "Mount Everest is 8849 metres high.",
        ),
        (
            "Qu'est-ce que la photosynthèse ?",
            "La photosynthèse convertit la lumière en énergie.",
        ),
        (
            "Who wrote Hamlet?",
            "Hamlet is a tragedy written by William Shakespeare.",
        ),
        ("Wie spät ist es?", "Es ist halb drei am Nachmittag."),
    ];
    let mut lines = String::new();
    for (i, (q, p)) in topics.iter().enumerate() {
        let negs: Vec<&str> = (1..4).map(|k| topics[(i + k) % topics.len()].1).collect();
        let rec = serde_json::json!({"query": q, "pos": [p], "neg": negs});
        lines.push_str(&format!("{rec}\n"));
    }
    let path = dir.join("train.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

fn options(data: PathBuf, out: PathBuf) -> TrainOptions {
    let mut o = TrainOptions::new(fixture(), vec![data], out);
    o.batch_size = 2;
    o.group = 3;
    o.query_max_len = 16;
    o.passage_max_len = 24;
    o.temperature = 0.05;
    o.adamw = AdamW {
        lr: 2e-3,
        ..AdamW::default()
    };
    o.linear_schedule = false;
    o.max_steps = Some(8);
    o.seed = 11;
    o.dropout = Some(0.0);
    o
}

#[test]
fn training_lowers_the_loss_and_writes_a_model_that_encodes() {
    let d = tmp("lower");
    let out = d.join("out");
    let metrics = d.join("metrics.jsonl");
    let opts = options(write_data(&d), out.clone());
    run_training(
        &Cpu,
        opts,
        DType::F32,
        false,
        Some(&metrics),
        &mut Silent,
        &Solo,
    )
    .unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 8);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i as u64 + 1);
        for key in [
            "loss",
            "dense",
            "sparse",
            "colbert",
            "ensemble",
            "distill",
            "lr",
            "grad_norm",
            "tokens_per_s",
        ] {
            assert!(l[key].as_f64().is_some_and(f64::is_finite), "{key} in {l}");
        }
    }
    // One epoch is 4 batches of 2; the second epoch sees the same records again.
    let loss = |i: usize| lines[i]["loss"].as_f64().unwrap();
    let first: f64 = (0..4).map(loss).sum();
    let second: f64 = (4..8).map(loss).sum();
    assert!(second < 0.7 * first, "epoch losses {first} then {second}");
    // The output directory is a model `m3 encode` loads, and training changed its vectors.
    let before = Embedder::load(&Cpu, &fixture(), DType::F32).unwrap();
    let after = Embedder::load(&Cpu, &out, DType::F32).unwrap();
    let opts = EncodeOptions {
        sparse: true,
        colbert: true,
        ..EncodeOptions::default()
    };
    let texts = ["Paris is the capital of France."];
    let a = before.encode(&Cpu, &texts, &opts, &mut |_| {}).unwrap();
    let b = after.encode(&Cpu, &texts, &opts, &mut |_| {}).unwrap();
    let (va, vb) = (
        a.embeddings[0].dense.as_ref().unwrap(),
        b.embeddings[0].dense.as_ref().unwrap(),
    );
    let diff: f32 = va.iter().zip(vb).map(|(x, y)| (x - y).abs()).sum();
    assert!(diff > 1e-3, "dense vector unchanged by training");
    // The heads trained too: the token weights and colbert vectors moved.
    let weight = |v: &[(u32, f32)], id: u32| v.iter().find(|e| e.0 == id).map_or(0.0, |e| e.1);
    let (la, lb) = (
        a.embeddings[0].lexical.as_ref().unwrap(),
        b.embeddings[0].lexical.as_ref().unwrap(),
    );
    assert!(la
        .iter()
        .chain(lb)
        .any(|&(id, _)| (weight(la, id) - weight(lb, id)).abs() > 1e-3));
    let (ca, cb) = (
        &a.embeddings[0].colbert.as_ref().unwrap()[0],
        &b.embeddings[0].colbert.as_ref().unwrap()[0],
    );
    assert!(ca.iter().zip(cb).any(|(x, y)| (x - y).abs() > 1e-3));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn resume_continues_bit_identically() {
    let d = tmp("resume");
    let data = write_data(&d);
    // Six steps cross the epoch boundary (4 batches of 2); dropout, a warm-up schedule and
    // sub-batches all on.
    let mut opts = options(data, d.join("straight"));
    opts.max_steps = Some(6);
    opts.dropout = Some(0.1);
    opts.linear_schedule = true;
    opts.warmup_ratio = 0.25;
    opts.sub_batch = Some(2);
    let mut a = Trainer::new(&Cpu, opts.clone(), DType::F32, false, &Solo).unwrap();
    let mut losses_a = Vec::new();
    while !a.finished() {
        losses_a.push(a.step().unwrap().loss.loss);
    }
    // The same run stopped after step 4 (its checkpoint, then two steps that are lost, as
    // in a crash), then resumed through `run_training` with the metrics file.
    opts.output_dir = d.join("split");
    opts.save_steps = Some(4);
    std::fs::create_dir_all(&opts.output_dir).unwrap();
    let metrics = d.join("metrics.jsonl");
    let mut b = Trainer::new(&Cpu, opts.clone(), DType::F32, false, &Solo).unwrap();
    let mut w = m3::train::metrics::MetricsWriter::open(&metrics, None).unwrap();
    for _ in 0..5 {
        let r = b.step().unwrap();
        w.write(&r.to_json()).unwrap();
        if r.step == 4 {
            b.save_checkpoint().unwrap();
        }
    }
    drop((b, w));
    run_training(
        &Cpu,
        opts.clone(),
        DType::F32,
        true,
        Some(&metrics),
        &mut Silent,
        &Solo,
    )
    .unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Step 5 of the lost tail was dropped; steps 5 and 6 come from the resumed run.
    assert_eq!(
        lines
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    let losses_b: Vec<f32> = lines
        .iter()
        .map(|l| l["loss"].as_f64().unwrap() as f32)
        .collect();
    assert_eq!(
        losses_a.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        losses_b.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        "{losses_a:?} vs {losses_b:?}"
    );
    // The final model equals the straight run's masters bit for bit.
    let fin = TrainModel::load(&Cpu, &opts.output_dir, DType::F32, 0)
        .unwrap()
        .masters(&Cpu)
        .unwrap();
    for (x, y) in a.masters_host().unwrap().iter().zip(&fin) {
        assert_eq!(x.name, y.name);
        assert!(
            x.data
                .iter()
                .zip(&y.data)
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{} differs after resuming",
            x.name
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn resume_refuses_other_settings_and_a_missing_checkpoint() {
    let d = tmp("refuse");
    let opts = options(write_data(&d), d.join("out"));
    std::fs::create_dir_all(&opts.output_dir).unwrap();
    let err = |o: &TrainOptions, resume: bool| {
        format!(
            "{:#}",
            Trainer::new(&Cpu, o.clone(), DType::F32, resume, &Solo)
                .err()
                .expect("should be refused")
        )
    };
    let e = err(&opts, true);
    assert!(e.contains("no checkpoint"), "{e}");
    let mut t = Trainer::new(&Cpu, opts.clone(), DType::F32, false, &Solo).unwrap();
    t.step().unwrap();
    t.save_checkpoint().unwrap();
    drop(t);
    // A fresh run into a directory with checkpoints is refused unless told to overwrite.
    let e = err(&opts, false);
    assert!(e.contains("--overwrite-output-dir"), "{e}");
    // Another seed is another run, named in the message; a smaller sub-batch is the same run.
    let mut other = opts.clone();
    other.seed += 1;
    let e = err(&other, true);
    assert!(
        e.contains("other settings") && e.contains("seed: 11 → 12"),
        "{e}"
    );
    let mut smaller = opts.clone();
    smaller.sub_batch = Some(1);
    let t = Trainer::new(&Cpu, smaller, DType::F32, true, &Solo).unwrap();
    assert_eq!(t.state().step, 1);
    drop(t);
    let mut fresh = opts.clone();
    fresh.overwrite_output_dir = true;
    Trainer::new(&Cpu, fresh, DType::F32, false, &Solo).unwrap();
    assert!(!opts.output_dir.join("checkpoint-1").exists());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint() {
    let d = tmp("nan");
    let mut opts = options(write_data(&d), d.join("out"));
    // A first step this large sends the weights to ±1e38; the next forward overflows.
    opts.adamw.lr = 1e38;
    opts.max_grad_norm = 0.0;
    opts.save_steps = Some(1);
    let e = run_training(&Cpu, opts, DType::F32, false, None, &mut Silent, &Solo)
        .expect_err("training should stop");
    let e = format!("{e:#}");
    assert!(e.contains("step 2") && e.contains("checkpoint-1"), "{e}");
    assert!(d.join("out/checkpoint-1/model.safetensors").exists());
    assert!(!d.join("out/checkpoint-2").exists());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn sub_batches_give_the_unsplit_gradient() {
    let mut model = TrainModel::load(&Cpu, &fixture(), DType::F32, 0).unwrap();
    let layout = ParamLayout::of(&mut model);
    let (batch, cfg) = common::steps::small_batch(&fixture());
    // Dropout on: the masks must follow tokens, not sub-batches.
    let drop = StepDropout { p: 0.2, seed: 3 };
    // The loss and each weight's gradient (model order) on the host.
    let grads = |sub: Option<usize>| {
        let mut g = GradArena::zeros(&Cpu, &layout).unwrap();
        let l = step_grads(
            &Cpu,
            &model,
            &layout,
            &batch,
            &cfg,
            drop,
            sub,
            &RankLoss::solo(),
            &mut g,
        )
        .unwrap();
        (l, g.per_slot(&Cpu, &layout).unwrap())
    };
    let (lw, whole) = grads(None);
    for n in [1, 2, 4] {
        let (ls, split) = grads(Some(n));
        assert!(
            (lw.loss - ls.loss).abs() <= 1e-5 * lw.loss.abs(),
            "sub-batch {n}: loss {} vs {}",
            lw.loss,
            ls.loss
        );
        assert_eq!(whole.len(), split.len());
        let host = |g: &[Option<Vec<f32>>]| -> Vec<Vec<f32>> {
            g.iter().map(|t| t.clone().unwrap()).collect()
        };
        let (whole_h, split_h) = (host(&whole), host(&split));
        let global = whole_h.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        for (k, (a, b)) in whole_h.iter().zip(&split_h).enumerate() {
            // A tensor whose exact gradient is 0 (the key bias: softmax ignores a constant
            // per row) holds rounding noise; measure it against the gradient as a whole.
            let scale = a
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()))
                .max(1e-3 * global);
            let worst = a
                .iter()
                .zip(b.iter())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-5 * scale,
                "sub-batch {n}: tensor #{k} differs by {worst} (scale {scale})"
            );
        }
    }
}

/// Host syncs of a training step, counted on the CPU through the same calls a GPU waits
/// on (tests/cuda_ops.rs holds the GPU to the same bound).
#[test]
fn a_training_step_makes_a_bounded_number_of_host_syncs() {
    for c in common::steps::step_host_syncs(&Cpu, &fixture(), DType::F32) {
        c.assert_bounded("cpu f32");
    }
}
