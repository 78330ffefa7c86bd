//! Data-parallel training with ranks as threads (SPEC §5 cross-device negatives, §6): the
//! averaged gradient of several ranks equals one device's gradient of the same loss over
//! the global batch, with and without gathering the passages, with uneven shares and with
//! sub-batches; every rank ends a run with the same weights.

use std::path::{Path, PathBuf};
use std::time::Duration;

use m3::backend::cpu::Cpu;
use m3::backend::Backend;
use m3::batch::{pack_in_order, PackedBatch};
use m3::collective::{Collective, ThreadGroup};
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::text::Encoded;
use m3::train::arena::{GradArena, ParamLayout};
use m3::train::forward::{step_grads, RankLoss, StepBatch, StepDropout};
use m3::train::loss::{LossConfig, LossValues};
use m3::train::model::TrainModel;
use m3::DType;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3")
}

const QUERIES: [&str; 4] = [
    "What is the capital of France?",
    "Der schnelle braune Fuchs",
    "狐狸",
    "How tall is Mount Everest?",
];

const PASSAGES: [&str; 8] = [
    "Paris is the capital of France.",
    "Berlin is a city in Germany.",
    "The quick brown fox jumps over the lazy dog.",
    "Быстрая коричневая лиса прыгает через собаку.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "Es ist halb drei am Nachmittag.",
    "Mount Everest is 8849 metres high.",
    "Hamlet is a tragedy written by William Shakespeare.",
];

struct Setup {
    model: TrainModel<Cpu>,
    layout: ParamLayout,
    queries: Vec<Encoded>,
    passages: Vec<Encoded>,
    excluded: Vec<u32>,
}

fn setup(queries: usize) -> Setup {
    let mut model = TrainModel::load(&Cpu, &fixture(), DType::F32, 0).unwrap();
    let layout = ParamLayout::of(&mut model);
    let m = Embedder::load(&Cpu, &fixture(), DType::F32).unwrap();
    let enc = |t: &str| m.tokenize(t, &EncodeOptions::default()).unwrap();
    let s = m.tokenizer.specials;
    Setup {
        model,
        layout,
        queries: QUERIES[..queries].iter().map(|t| enc(t)).collect(),
        passages: PASSAGES[..2 * queries].iter().map(|t| enc(t)).collect(),
        excluded: vec![s.cls, s.eos, s.pad.unwrap(), s.unk.unwrap()],
    }
}

impl Setup {
    fn pack(&self, v: &[Encoded]) -> PackedBatch {
        pack_in_order(v, self.model.config.position_offset())
    }

    /// Queries `q` and their groups of two passages.
    fn batch(&self, q: std::ops::Range<usize>) -> StepBatch {
        StepBatch {
            q: self.pack(&self.queries[q.clone()]),
            p: self.pack(&self.passages[2 * q.start..2 * q.end]),
        }
    }

    /// One device's loss and per-slot gradient over queries `q`.
    fn solo(&self, q: std::ops::Range<usize>, cfg: &LossConfig) -> (LossValues, Vec<Vec<f32>>) {
        let mut g = GradArena::zeros(&Cpu, &self.layout).unwrap();
        let drop = StepDropout { p: 0.0, seed: 0 };
        let l = step_grads(
            &Cpu,
            &self.model,
            &self.layout,
            &self.batch(q),
            cfg,
            drop,
            None,
            &RankLoss::solo(),
            &mut g,
        )
        .unwrap();
        (l, self.host(&g))
    }

    /// Each rank's weighted loss and the gradient averaged over ranks, rank `r` taking
    /// queries `shares[r]`.
    fn ranks(
        &self,
        shares: &[std::ops::Range<usize>],
        cfg: &LossConfig,
        cross_device: bool,
        sub_batch: Option<usize>,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let world = shares.len();
        let total: usize = shares.iter().map(|r| r.len()).sum();
        let groups = ThreadGroup::new(world, Duration::from_secs(60));
        let out: Vec<(f32, Vec<Vec<f32>>)> = std::thread::scope(|s| {
            let hs: Vec<_> = groups
                .into_iter()
                .zip(shares)
                .map(|(comm, share)| {
                    s.spawn(move || {
                        let weight = (world * share.len()) as f32 / total as f32;
                        let rank = RankLoss {
                            comm: &comm,
                            cross_device,
                            weight,
                        };
                        let mut g = GradArena::zeros(&Cpu, &self.layout).unwrap();
                        let drop = StepDropout { p: 0.0, seed: 0 };
                        let l = step_grads(
                            &Cpu,
                            &self.model,
                            &self.layout,
                            &self.batch(share.clone()),
                            cfg,
                            drop,
                            sub_batch,
                            &rank,
                            &mut g,
                        )
                        .unwrap();
                        comm.all_reduce_sum(&Cpu, g.flat_mut()).unwrap();
                        let avg: Vec<Vec<f32>> = self
                            .host(&g)
                            .into_iter()
                            .map(|v| v.into_iter().map(|x| x / world as f32).collect())
                            .collect();
                        (l.loss * weight, avg)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Every rank holds the same averaged gradient.
        for (r, o) in out.iter().enumerate().skip(1) {
            assert_eq!(
                o.1, out[0].1,
                "rank {r}'s averaged gradient differs from rank 0's"
            );
        }
        (out.iter().map(|o| o.0).collect(), out[0].1.clone())
    }

    fn host(&self, g: &GradArena<Cpu>) -> Vec<Vec<f32>> {
        g.per_slot(&Cpu, &self.layout)
            .unwrap()
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect()
    }
}

/// The ranks' weighted losses average to `want` (relative 1e-5).
fn assert_mean_loss(what: &str, losses: &[f32], want: f32) {
    let mean = losses.iter().sum::<f32>() / losses.len() as f32;
    assert!(
        (mean - want).abs() <= 1e-5 * want.abs(),
        "{what}: loss {mean} vs {want}"
    );
}

/// Each tensor's gradient within 1e-5 of its largest entry. The key biases' exact
/// gradient is 0 (softmax ignores a per-row constant): what they hold is the rounding left
/// by cancelling contributions, which the ranks add in another order, so they are held to
/// 1e-5 of the largest gradient anywhere instead.
fn assert_close(layout: &ParamLayout, what: &str, want: &[Vec<f32>], got: &[Vec<f32>]) {
    let global = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    assert!(global > 0.0, "{what}: no gradient at all");
    for (k, (a, b)) in want.iter().zip(got).enumerate() {
        let name = &layout.slots()[k].name;
        assert_eq!(a.len(), b.len(), "{what}: {name} present on one side only");
        let own = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = if name.ends_with("attention.self.key.bias") {
            global
        } else {
            own.max(1e-3 * global)
        };
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5 * scale,
            "{what}: {name} differs by {worst} (scale {scale})"
        );
    }
}

#[test]
fn gathered_passages_give_one_devices_dense_gradient_over_the_global_batch() {
    let s = setup(4);
    let mut cfg = LossConfig::new(2, s.excluded.clone());
    cfg.dense_only = true;
    cfg.temperature = 0.05;
    let (one, want) = s.solo(0..4, &cfg);
    let (losses, got) = s.ranks(&[0..2, 2..4], &cfg, true, None);
    assert_mean_loss("ranks", &losses, one.loss);
    assert_close(&s.layout, "cross-device dense", &want, &got);
    // Without gathering, each rank sees only its own passages: a different loss.
    let (local, _) = s.ranks(&[0..2, 2..4], &cfg, false, None);
    let local = local.iter().sum::<f32>() / 2.0;
    assert!(
        (local - one.loss).abs() > 1e-3,
        "local {local} vs global {}",
        one.loss
    );
}

#[test]
fn uneven_shares_without_in_batch_negatives_average_to_one_devices_gradient() {
    // Each query scored against its own group only: every term of the unified loss with
    // self-distillation is per query, so the weighted average over ranks of 2 and 1
    // queries is the one-device loss over all 3.
    let s = setup(3);
    let mut cfg = LossConfig::new(2, s.excluded.clone());
    cfg.in_batch_neg = false;
    cfg.temperature = 0.05;
    let (one, want) = s.solo(0..3, &cfg);
    let (losses, got) = s.ranks(&[0..2, 2..3], &cfg, false, None);
    assert_mean_loss("ranks", &losses, one.loss);
    assert_close(&s.layout, "uneven shares", &want, &got);
}

#[test]
fn sub_batches_with_gathered_passages_give_the_unsplit_gradient() {
    // The unified loss with cross-device dense negatives; re-encoding one sequence at a
    // time must give what the kept tapes give.
    let s = setup(4);
    let mut cfg = LossConfig::new(2, s.excluded.clone());
    cfg.temperature = 0.05;
    let (whole_l, whole) = s.ranks(&[0..2, 2..4], &cfg, true, None);
    let (split_l, split) = s.ranks(&[0..2, 2..4], &cfg, true, Some(1));
    for (a, b) in whole_l.iter().zip(&split_l) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "loss {a} vs {b}");
    }
    assert_close(&s.layout, "sub-batched cross-device", &whole, &split);
}

fn data_file(dir: &Path) -> PathBuf {
    let mut lines = String::new();
    for (i, q) in QUERIES.iter().enumerate() {
        let negs: Vec<&str> = (1..4).map(|k| PASSAGES[(2 * i + 2 * k) % 8]).collect();
        let rec = serde_json::json!({"query": q, "pos": [PASSAGES[2 * i]], "neg": negs});
        lines.push_str(&format!("{rec}\n"));
    }
    let path = dir.join("train.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

#[test]
fn every_rank_ends_a_run_with_the_same_weights_and_the_loss_falls() {
    use m3::train::optim::AdamW;
    use m3::train::options::TrainOptions;
    use m3::train::trainer::Trainer;
    let d = std::env::temp_dir().join(format!("m3-dist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let mut o = TrainOptions::new(fixture(), vec![data_file(&d)], d.join("out"));
    o.batch_size = 1;
    o.group = 2;
    o.query_max_len = 16;
    o.passage_max_len = 24;
    o.temperature = 0.05;
    o.adamw = AdamW {
        lr: 2e-3,
        ..AdamW::default()
    };
    o.linear_schedule = false;
    o.max_steps = Some(6);
    o.seed = 3;
    o.negatives_cross_device = true;
    o.shuffle = false;
    let groups = ThreadGroup::new(2, Duration::from_secs(60));
    let out: Vec<(Vec<f32>, Vec<Vec<f32>>)> = std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .into_iter()
            .map(|comm| {
                let o = o.clone();
                s.spawn(move || {
                    let mut t = Trainer::new(&Cpu, o, DType::F32, false, &comm).unwrap();
                    let mut losses = Vec::new();
                    while !t.finished() {
                        losses.push(t.step().unwrap().loss.loss);
                    }
                    let w = t
                        .masters_host()
                        .unwrap()
                        .into_iter()
                        .map(|m| m.data)
                        .collect();
                    (losses, w)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(out[0].1, out[1].1, "the ranks' weights drifted apart");
    // The reported loss is the mean over ranks, so every rank reports the same.
    assert_eq!(out[0].0, out[1].0);
    let l = &out[0].0;
    assert!(l.iter().all(|x| x.is_finite()), "{l:?}");
    // Two steps cover the four records once (global batch 2); compare the same batches.
    assert!(l[4] + l[5] < l[0] + l[1], "loss did not fall: {l:?}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// The SPEC loss of `world` ranks with gathered passages, written as one tape over the whole
/// global batch: every rank's slice encoded on it, every rank's dense term against the
/// passages of all (encoded once more, whole), its sparse, colbert, ensemble and
/// self-distillation terms within its slice, each rank's loss weighted by its share. The
/// gradient of this one-device loss is what the ranks' averaged gradient must equal.
fn one_tape_reference(
    s: &Setup,
    shares: &[std::ops::Range<usize>],
    cfg: &LossConfig,
) -> (f32, Vec<Vec<f32>>) {
    use m3::autograd::Tape;
    use m3::model::encoder::Dropout;
    use m3::train::forward::heads;
    use m3::train::loss::{m3_loss, CrossDevice};
    let world = shares.len();
    let total: usize = shares.iter().map(|r| r.len()).sum();
    let off = Dropout {
        p: 0.0,
        seed: 0,
        token_offset: 0,
    };
    let c = &s.model.config;
    let mut t = Tape::new(&Cpu);
    let vars = s.model.record(&mut t);
    let all = s.batch(0..total);
    let p_all = heads(&mut t, &vars.encoder, &vars.heads, c, &all.p, &off).unwrap();
    let mut loss = None;
    for share in shares {
        let b = s.batch(share.clone());
        let q = heads(&mut t, &vars.encoder, &vars.heads, c, &b.q, &off).unwrap();
        let p = heads(&mut t, &vars.encoder, &vars.heads, c, &b.p, &off).unwrap();
        let cross = CrossDevice {
            passages: p_all.dense,
            q0: share.start,
            p0: share.start * cfg.group,
            masked_columns: Vec::new(),
        };
        let l = m3_loss(&mut t, &q, &p, cfg, Some(&cross)).unwrap().loss;
        let weight = (world * share.len()) as f32 / total as f32;
        let l = t.scale(l, weight / world as f32).unwrap();
        loss = Some(match loss {
            None => l,
            Some(acc) => t.add(acc, l).unwrap(),
        });
    }
    let loss = loss.unwrap();
    let value = Cpu.to_vec_f32(t.value(loss)).unwrap()[0];
    let mut g = t.backward(loss).unwrap();
    let grads = vars
        .all()
        .into_iter()
        .map(|v| {
            g.take(v)
                .map(|x| Cpu.to_vec_f32(&x).unwrap())
                .unwrap_or_default()
        })
        .collect();
    (value, grads)
}

#[test]
fn two_and_four_ranks_with_the_unified_loss_match_one_tape_over_the_global_batch() {
    let s = setup(4);
    let mut cfg = LossConfig::new(2, s.excluded.clone());
    cfg.temperature = 0.05;
    for shares in [
        vec![0..2, 2..4],
        vec![0..1, 1..2, 2..3, 3..4],
        vec![0..3, 3..4],
    ] {
        let (want_loss, want) = one_tape_reference(&s, &shares, &cfg);
        for sub in [None, Some(1)] {
            let (losses, got) = s.ranks(&shares, &cfg, true, sub);
            let what = format!("{} ranks, sub-batch {sub:?}", shares.len());
            assert_mean_loss(&what, &losses, want_loss);
            assert_close(&s.layout, &what, &want, &got);
        }
    }
}

#[test]
fn the_gathered_dense_gradient_matches_finite_differences() {
    // d(mean over ranks of the weighted loss) / d(one embedding LayerNorm gain), central
    // differences against the ranks' averaged gradient.
    let mut s = setup(4);
    let mut cfg = LossConfig::new(2, s.excluded.clone());
    cfg.dense_only = true;
    cfg.temperature = 0.05;
    let shares = [0..2, 2..4];
    let k = s
        .layout
        .slots()
        .iter()
        .position(|x| x.name == "embeddings.LayerNorm.weight")
        .unwrap();
    let (_, g) = s.ranks(&shares, &cfg, true, None);
    let base = Cpu.to_vec_f32(&s.model.params.encoder.emb_norm.g).unwrap();
    let mut at = |i: usize, d: f32| -> f64 {
        let mut w = base.clone();
        w[i] += d;
        Cpu.write_f32(&mut s.model.params.encoder.emb_norm.g, &w)
            .unwrap();
        let (l, _) = s.ranks(&shares, &cfg, true, None);
        l.iter().map(|&x| x as f64).sum::<f64>() / 2.0
    };
    let eps = 1e-2;
    for i in [0, 5, 17] {
        let fd = (at(i, eps) - at(i, -eps)) / (2.0 * eps as f64);
        let an = g[k][i] as f64;
        assert!(
            (fd - an).abs() <= 2e-2 * an.abs() + 2e-4,
            "element {i}: finite differences {fd:.6} vs gradient {an:.6}"
        );
    }
}
