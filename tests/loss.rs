//! The SPEC §5 loss on the tape: gradients of the unified loss against finite differences,
//! and its value (with self-distillation) against a direct f64 evaluation of the formulas.

use std::collections::BTreeMap;

use m3::autograd::{Tape, Var};
use m3::backend::cpu::Cpu;
use m3::backend::Backend;
use m3::gradcheck::{check, Input, Tolerance};
use m3::rng::Rng;
use m3::score;
use m3::train::loss::{m3_loss, KdLoss, LossConfig, Side};

const B: usize = 2;
const G: usize = 2;
const D: usize = 4;
const C: usize = 3;

/// Token layout of one side: ids and offsets; colbert rows are all tokens but the first.
#[derive(Clone)]
struct Layout {
    ids: Vec<u32>,
    cu: Vec<u32>,
    colbert_cu: Vec<u32>,
}

fn layout(rng: &mut Rng, n: usize) -> Layout {
    let mut ids = Vec::new();
    let mut cu = vec![0u32];
    let mut colbert_cu = vec![0u32];
    for _ in 0..n {
        let len = 3 + rng.below(3) as usize;
        ids.push(0); // CLS: excluded from lexical weights
        ids.extend((1..len).map(|_| 1 + rng.below(5)));
        cu.push(ids.len() as u32);
        colbert_cu.push(colbert_cu.last().unwrap() + len as u32 - 1);
    }
    Layout {
        ids,
        cu,
        colbert_cu,
    }
}

/// Inputs q_dense, p_dense, q_sparse, p_sparse, q_colbert, p_colbert with the lexical
/// scatter-max and the max-sim free of near-ties (finite differences cross no kink).
fn inputs(rng: &mut Rng, q: &Layout, p: &Layout) -> Vec<Input> {
    let f = |shape: &[usize], data: Vec<f32>| Input::Float {
        shape: shape.to_vec(),
        data,
        grad: true,
    };
    let weights = |rng: &mut Rng, l: &Layout| loop {
        let w = rng.vec(l.ids.len(), 0.1, 1.5);
        let ok = l.cu.windows(2).all(|s| {
            let r = s[0] as usize..s[1] as usize;
            r.clone().all(|a| {
                r.clone()
                    .all(|b| a == b || l.ids[a] != l.ids[b] || (w[a] - w[b]).abs() > 0.05)
            })
        });
        if ok {
            break w;
        }
    };
    let (qw, pw) = (weights(rng, q), weights(rng, p));
    let (tq, tp) = (
        *q.colbert_cu.last().unwrap() as usize,
        *p.colbert_cu.last().unwrap() as usize,
    );
    let (qc, pc) = loop {
        let (a, b) = (rng.vec(tq * C, -1.0, 1.0), rng.vec(tp * C, -1.0, 1.0));
        let ok = (0..tq).all(|i| {
            p.colbert_cu.windows(2).all(|w| {
                let mut s: Vec<f32> = (w[0] as usize..w[1] as usize)
                    .map(|j| (0..C).map(|c| a[i * C + c] * b[j * C + c]).sum())
                    .collect();
                s.sort_by(|x, y| y.total_cmp(x));
                s.len() < 2 || s[0] - s[1] > 0.05
            })
        });
        if ok {
            break (a, b);
        }
    };
    vec![
        f(&[B, D], rng.vec(B * D, -1.0, 1.0)),
        f(&[B * G, D], rng.vec(B * G * D, -1.0, 1.0)),
        f(&[q.ids.len()], qw),
        f(&[p.ids.len()], pw),
        f(&[tq, C], qc),
        f(&[tp, C], pc),
    ]
}

fn sides(v: &[Var], q: &Layout, p: &Layout) -> (Side, Side) {
    let side = |d, s, c, l: &Layout| Side {
        dense: d,
        sparse: s,
        ids: l.ids.clone(),
        cu: l.cu.clone(),
        colbert: c,
        colbert_cu: l.colbert_cu.clone(),
    };
    (side(v[0], v[2], v[4], q), side(v[1], v[3], v[5], p))
}

fn config(self_distill: bool, dense_only: bool) -> LossConfig {
    // τ = 0.5 keeps the scores moderate so central differences stay accurate.
    LossConfig {
        temperature: 0.5,
        group: G,
        dense_only,
        self_distill,
        excluded: vec![0],
        in_batch_neg: true,
        teacher: None,
        masked_columns: Vec::new(),
    }
}

/// The variants beyond plain in-batch negatives: each query's own group only, the two
/// teacher losses (with and without in-batch negatives), and a masked stand-in column.
fn variants() -> Vec<(&'static str, LossConfig)> {
    let teacher = vec![0.7, -0.2, 1.1, 0.4];
    let base = config(false, false);
    vec![
        (
            "own group",
            LossConfig {
                in_batch_neg: false,
                ..base.clone()
            },
        ),
        (
            "kl_div",
            LossConfig {
                teacher: Some((teacher.clone(), KdLoss::KlDiv)),
                ..base.clone()
            },
        ),
        (
            "m3_kd_loss, own group",
            LossConfig {
                in_batch_neg: false,
                teacher: Some((teacher.clone(), KdLoss::M3KdLoss)),
                ..base.clone()
            },
        ),
        (
            "stand-in masked, m3_kd_loss",
            LossConfig {
                teacher: Some((teacher, KdLoss::M3KdLoss)),
                masked_columns: vec![3],
                ..base
            },
        ),
    ]
}

#[test]
fn loss_variants_gradients_match_finite_differences() {
    for seed in 0..4u64 {
        let mut rng = Rng::new(100 + seed);
        let (q, p) = (layout(&mut rng, B), layout(&mut rng, B * G));
        let ins = inputs(&mut rng, &q, &p);
        for (name, cfg) in variants() {
            let (q, p) = (q.clone(), p.clone());
            let f = move |t: &mut Tape<'_, Cpu>, v: &[Var]| {
                let (qs, ps) = sides(v, &q, &p);
                Ok(m3_loss(t, &qs, &ps, &cfg, None)?.loss)
            };
            for r in check(&Cpu, &ins, &f, Tolerance::default(), seed).unwrap() {
                assert!(
                    r.worst_ratio <= 1.0,
                    "seed {seed} {name} input {}: {r:?}",
                    r.input
                );
            }
        }
    }
}

#[test]
fn a_masked_stand_in_passage_does_not_enter_the_loss() {
    // Passage 3 (the second of query 1's group) is a stand-in: changing its vectors and
    // weights changes nothing, and it gets no gradient.
    let mut rng = Rng::new(7);
    let (q, p) = (layout(&mut rng, B), layout(&mut rng, B * G));
    let ins = inputs(&mut rng, &q, &p);
    let cfg = variants().pop().unwrap().1;
    let run = |ins: &[Input]| -> (f32, Vec<f32>, Vec<f32>) {
        let mut t = Tape::new(&Cpu);
        let vars: Vec<Var> = ins
            .iter()
            .map(|i| match i {
                Input::Float { shape, data, .. } => {
                    t.param_owned(Cpu.upload(m3::HostData::F32(data), shape).unwrap())
                }
                Input::Ids { .. } => unreachable!(),
            })
            .collect();
        let (qs, ps) = sides(&vars, &q, &p);
        let loss = m3_loss(&mut t, &qs, &ps, &cfg, None).unwrap().loss;
        let g = t.backward(loss).unwrap();
        let grad = |k: usize| Cpu.to_vec_f32(g.get(vars[k]).unwrap()).unwrap();
        (
            Cpu.to_vec_f32(t.value(loss)).unwrap()[0],
            grad(1)[3 * D..4 * D].to_vec(),
            grad(3)[p.cu[3] as usize..p.cu[4] as usize].to_vec(),
        )
    };
    let (l0, gd, gs) = run(&ins);
    assert!(gd.iter().chain(&gs).all(|&x| x == 0.0), "{gd:?} {gs:?}");
    let mut moved = ins.clone();
    if let Input::Float { data, .. } = &mut moved[1] {
        for x in &mut data[3 * D..4 * D] {
            *x = -*x;
        }
    }
    if let Input::Float { data, .. } = &mut moved[3] {
        for x in &mut data[p.cu[3] as usize..p.cu[4] as usize] {
            *x += 0.5;
        }
    }
    let (l1, _, _) = run(&moved);
    assert_eq!(l0.to_bits(), l1.to_bits(), "{l0} vs {l1}");
}

#[test]
fn unified_loss_gradients_match_finite_differences() {
    for seed in 0..8u64 {
        let mut rng = Rng::new(seed);
        let (q, p) = (layout(&mut rng, B), layout(&mut rng, B * G));
        let ins = inputs(&mut rng, &q, &p);
        for dense_only in [false, true] {
            let (q, p) = (q.clone(), p.clone());
            let f = move |t: &mut Tape<'_, Cpu>, v: &[Var]| {
                let (qs, ps) = sides(v, &q, &p);
                Ok(m3_loss(t, &qs, &ps, &config(false, dense_only), None)?.loss)
            };
            let reports = check(&Cpu, &ins, &f, Tolerance::default(), seed).unwrap();
            for r in reports {
                if dense_only && r.input >= 2 {
                    // Dense-only: the other heads get no gradient at all.
                    assert!(
                        r.max_abs_diff < 1e-9,
                        "seed {seed} input {}: {r:?}",
                        r.input
                    );
                }
                assert!(
                    r.worst_ratio <= 1.0,
                    "seed {seed} dense_only {dense_only} input {}: {r:?}",
                    r.input
                );
            }
        }
    }
}

fn data(i: &Input) -> &[f32] {
    match i {
        Input::Float { data, .. } => data,
        Input::Ids { .. } => unreachable!(),
    }
}

/// Max weight per id, special id 0 dropped, as `(id, w)` sorted by id.
fn lexical_map(w: &[f32], ids: &[u32], r: std::ops::Range<usize>) -> Vec<(u32, f32)> {
    let mut m: BTreeMap<u32, f32> = BTreeMap::new();
    for i in r {
        if ids[i] != 0 {
            let e = m.entry(ids[i]).or_insert(w[i]);
            *e = e.max(w[i]);
        }
    }
    m.into_iter().collect()
}

#[test]
fn loss_value_with_self_distillation_matches_the_formulas() {
    let mut rng = Rng::new(11);
    let (q, p) = (layout(&mut rng, B), layout(&mut rng, B * G));
    let ins = inputs(&mut rng, &q, &p);
    let mut tape = Tape::new(&Cpu);
    let vars: Vec<Var> = ins
        .iter()
        .map(|i| {
            tape.param_owned(
                Cpu.upload(
                    m3::HostData::F32(data(i)),
                    match i {
                        Input::Float { shape, .. } => shape,
                        _ => unreachable!(),
                    },
                )
                .unwrap(),
            )
        })
        .collect();
    let (qs, ps) = sides(&vars, &q, &p);
    let parts = m3_loss(&mut tape, &qs, &ps, &config(true, false), None).unwrap();
    let got = Cpu.to_vec_f32(tape.value(parts.loss)).unwrap()[0] as f64;

    // The same loss straight from SPEC §5 in f64.
    let tau = 0.5f64;
    let rows = |x: &[f32], w: usize| x.chunks(w).map(|r| r.to_vec()).collect::<Vec<_>>();
    let (qd, pd) = (rows(data(&ins[0]), D), rows(data(&ins[1]), D));
    let (qc, pc) = (rows(data(&ins[4]), C), rows(data(&ins[5]), C));
    let seqs = |cu: &[u32]| {
        cu.windows(2)
            .map(|w| w[0] as usize..w[1] as usize)
            .collect::<Vec<_>>()
    };
    let mut sd = vec![vec![0f64; B * G]; B];
    let mut ss = sd.clone();
    let mut sm = sd.clone();
    for b in 0..B {
        let qb = seqs(&q.cu)[b].clone();
        let qcb = seqs(&q.colbert_cu)[b].clone();
        for n in 0..B * G {
            sd[b][n] = score::dense(&qd[b], &pd[n]) as f64 / tau;
            let (lq, lp) = (
                lexical_map(data(&ins[2]), &q.ids, qb.clone()),
                lexical_map(data(&ins[3]), &p.ids, seqs(&p.cu)[n].clone()),
            );
            ss[b][n] = score::lexical(&lq, &lp) as f64 / tau;
            sm[b][n] =
                score::colbert(&qc[qcb.clone()], &pc[seqs(&p.colbert_cu)[n].clone()]) as f64 / tau;
        }
    }
    let se: Vec<Vec<f64>> = (0..B)
        .map(|b| {
            (0..B * G)
                .map(|n| sd[b][n] + 0.3 * ss[b][n] + sm[b][n])
                .collect()
        })
        .collect();
    let log_softmax = |r: &[f64]| {
        let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = m + r.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        r.iter().map(|x| x - l).collect::<Vec<f64>>()
    };
    let ce = |s: &[Vec<f64>]| (0..B).map(|b| -log_softmax(&s[b])[b * G]).sum::<f64>() / B as f64;
    let teacher: Vec<Vec<f64>> = se
        .iter()
        .map(|r| log_softmax(r).iter().map(|x| x.exp()).collect())
        .collect();
    let kd = |s: &[Vec<f64>]| {
        (0..B)
            .map(|b| {
                -log_softmax(&s[b])
                    .iter()
                    .zip(&teacher[b])
                    .map(|(l, t)| l * t)
                    .sum::<f64>()
            })
            .sum::<f64>()
            / B as f64
    };
    let l = (ce(&sd) + ce(&se) + 0.1 * ce(&ss) + ce(&sm)) / 4.0;
    let l2 = (kd(&sd) + 0.1 * kd(&ss) + kd(&sm)) / 3.0;
    let want = (l + l2) / 2.0;
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "loss {got} vs {want}"
    );
}
