//! CPU reference: every op's backward against central finite differences on random shapes,
//! and forward values against hand-computed cases.

use m3::autograd::Tape;
use m3::backend::cpu::Cpu;
use m3::backend::Backend;
use m3::gradcheck::{check, op_cases, CaseDims, Input, Tolerance};
use m3::rng::Rng;
use m3::{DType, HostData};
use proptest::prelude::*;

fn run_all(dims: CaseDims, seed: u64) -> Result<(), TestCaseError> {
    let be = Cpu;
    let mut rng = Rng::new(seed);
    for case in op_cases::<Cpu>(&mut rng, dims) {
        let reports = check(&be, &case.inputs, &*case.f, Tolerance::default(), seed)
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", case.name)))?;
        prop_assert!(
            !reports.is_empty(),
            "{}: no gradient was checked",
            case.name
        );
        for r in reports {
            prop_assert!(
                r.worst_ratio <= 1.0,
                "{} {dims:?}: input {} gradient off at element {} (|diff| {:.2e}, ratio {:.2})",
                case.name,
                r.input,
                r.worst_index,
                r.max_abs_diff,
                r.worst_ratio
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn every_op_matches_finite_differences(
        rows in 1usize..6, cols in 1usize..9, inner in 1usize..7, vocab in 1usize..6, seed in any::<u64>()
    ) {
        run_all(CaseDims { rows, cols, inner, vocab }, seed)?;
    }
}

#[test]
fn checker_flags_a_wrong_gradient() {
    // At x = 0 ReLU's one-sided derivative (0) disagrees with the central difference (1/2):
    // the checker must say so, or it could never catch a broken backward.
    let inputs = vec![Input::Float {
        shape: vec![1, 1],
        data: vec![0.0],
        grad: true,
    }];
    let reports = check(&Cpu, &inputs, &|t, v| t.relu(v[0]), Tolerance::default(), 3).unwrap();
    assert!(reports[0].worst_ratio > 1.0, "{reports:?}");
}

fn up(data: &[f32], shape: &[usize]) -> m3::Tensor<Cpu> {
    Cpu.upload(HostData::F32(data), shape).unwrap()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "element {i}: {x} vs {y}");
    }
}

#[test]
fn forward_values_by_hand() {
    let be = Cpu;
    // LayerNorm of [1, 2, 3]: mean 2, var 2/3.
    let s = (2.0f32 / 3.0 + 1e-5).sqrt();
    let ln = be
        .layernorm(
            &up(&[1., 2., 3.], &[1, 3]),
            &up(&[1., 2., 1.], &[3]),
            &up(&[0., 0., 1.], &[3]),
            1e-5,
        )
        .unwrap();
    close(
        &be.to_vec_f32(&ln.y).unwrap(),
        &[-1. / s, 0., 1. / s + 1.],
        1e-6,
    );
    close(&be.to_vec_f32(&ln.mean).unwrap(), &[2.0], 1e-7);
    // Exact GELU: Φ(1) = 0.841344746, so gelu(1) = 0.841344746 and gelu(-1) = -0.158655254.
    let g = be.gelu(&up(&[1.0, -1.0, 0.0], &[3])).unwrap();
    close(
        &be.to_vec_f32(&g).unwrap(),
        &[0.841_344_7, -0.158_655_25, 0.0],
        1e-7,
    );
    // Matmul with bias: [[1,2],[3,4]] · [[1,0],[0,1]]ᵀ + [10, 20].
    let c = be
        .matmul(
            &up(&[1., 2., 3., 4.], &[2, 2]),
            false,
            &up(&[1., 0., 0., 1.], &[2, 2]),
            true,
            Some(&up(&[10., 20.], &[2])),
            DType::F32,
        )
        .unwrap();
    close(&be.to_vec_f32(&c).unwrap(), &[11., 22., 13., 24.], 0.0);
    // Aᵀ·B with A stored [2,3]: [[1,4],[2,5],[3,6]] · [[1],[1]] = [5, 7, 9].
    let c = be
        .matmul(
            &up(&[1., 2., 3., 4., 5., 6.], &[2, 3]),
            true,
            &up(&[1., 1.], &[2, 1]),
            false,
            None,
            DType::F32,
        )
        .unwrap();
    close(&be.to_vec_f32(&c).unwrap(), &[5., 7., 9.], 0.0);
    // Cross-entropy of logits [0, ln 3] with target 1: -log(3/4).
    let targets = be.upload(HostData::U32(&[1]), &[1]).unwrap();
    let (loss, _) = be
        .softmax_cross_entropy(&up(&[0.0, 3f32.ln()], &[1, 2]), &targets)
        .unwrap();
    close(&be.to_vec_f32(&loss).unwrap(), &[-(0.75f32).ln()], 1e-6);
    // L2 normalise [3, 4] -> [0.6, 0.8], norm 5; a zero row stays zero.
    let (y, n) = be
        .l2_normalize(&up(&[3., 4., 0., 0.], &[2, 2]), 1e-12)
        .unwrap();
    close(&be.to_vec_f32(&y).unwrap(), &[0.6, 0.8, 0., 0.], 1e-7);
    close(&be.to_vec_f32(&n).unwrap(), &[5., 0.], 1e-7);
    // Embedding scatter-add sums repeated ids.
    let ids = be.upload(HostData::U32(&[1, 1, 0]), &[3]).unwrap();
    let dt = be
        .embedding_backward(&up(&[1., 2., 3., 4., 5., 6.], &[3, 2]), &ids, 3)
        .unwrap();
    close(&be.to_vec_f32(&dt).unwrap(), &[5., 6., 4., 6., 0., 0.], 0.0);
}

#[test]
fn retrieval_scores_by_hand() {
    use m3::backend::LexicalSide;
    let be = Cpu;
    // Max-sim: one query [[1,0],[0,1]]; passages {[0.6,0.8], [-1,0]} and {[0,1]}.
    let q = up(&[1., 0., 0., 1.], &[2, 2]);
    let p = up(&[0.6, 0.8, -1., 0., 0., 1.], &[3, 2]);
    let (s, arg) = be.maxsim(&q, &[0, 2], &p, &[0, 2, 3]).unwrap();
    close(&be.to_vec_f32(&s).unwrap(), &[0.7, 0.5], 1e-6);
    assert_eq!(be.to_vec_u32(&arg).unwrap(), vec![0, 2, 0, 2]);
    // Lexical: query ids [0,5,7,5] (0 excluded) -> {5: 3, 7: 2}; passage [5,7,7] -> {5: 2, 7: 4}.
    let (wq, wp) = (up(&[9., 1., 2., 3.], &[4]), up(&[2., 1., 4.], &[3]));
    let qs = LexicalSide {
        weights: &wq,
        ids: &[0, 5, 7, 5],
        cu: &[0, 4],
        excluded: &[0],
    };
    let ps = LexicalSide {
        weights: &wp,
        ids: &[5, 7, 7],
        cu: &[0, 3],
        excluded: &[0],
    };
    let s = be.lexical_scores(&qs, &ps).unwrap();
    close(&be.to_vec_f32(&s).unwrap(), &[14.0], 0.0);
    // Gradients land on the arg-max occurrence only.
    let (dq, dp) = be
        .lexical_scores_backward(&up(&[1.0], &[1, 1]), &qs, &ps)
        .unwrap();
    close(&be.to_vec_f32(&dq).unwrap(), &[0., 0., 4., 2.], 0.0);
    close(&be.to_vec_f32(&dp).unwrap(), &[3., 0., 2.], 0.0);
    // Soft cross-entropy of [0, ln 3] against [1/2, 1/2]: -(ln 1/4 + ln 3/4) / 2.
    let (loss, _) = be
        .soft_cross_entropy(&up(&[0.0, 3f32.ln()], &[1, 2]), &up(&[0.5, 0.5], &[1, 2]))
        .unwrap();
    close(
        &be.to_vec_f32(&loss).unwrap(),
        &[-(0.25f32.ln() + 0.75f32.ln()) / 2.0],
        1e-6,
    );
}

#[test]
fn bad_inputs_are_named_errors() {
    let be = Cpu;
    let a = up(&[0.; 6], &[2, 3]);
    let err = be
        .matmul(&a, false, &a, false, None, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inner dimensions") && err.contains("[2, 3]"),
        "{err}"
    );
    let ids = be.upload(HostData::U32(&[0, 7]), &[2]).unwrap();
    let err = be.embedding(&a, &ids).unwrap_err().to_string();
    assert!(err.contains("id 7") && err.contains("below 2"), "{err}");
    let bf = be.cast(&a, DType::BF16).unwrap();
    let err = be.gelu(&bf).unwrap_err().to_string();
    assert!(err.contains("bf16"), "{err}");
    let err = be
        .upload(HostData::F32(&[1.0]), &[2])
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fill"), "{err}");
}

#[test]
fn tape_accumulates_a_value_used_twice() {
    // y = x + x: dy/dx = 2 per element.
    let be = Cpu;
    let mut tape = Tape::new(&be);
    let x = tape.param_owned(up(&[1., 2.], &[2]));
    let y = tape.add(x, x).unwrap();
    let g = tape.backward_with(y, up(&[1., 1.], &[2])).unwrap();
    close(&be.to_vec_f32(g.get(x).unwrap()).unwrap(), &[2., 2.], 0.0);
    // Backward from a non-scalar root without a seed is an error, not a guess.
    assert!(tape.backward(y).is_err());
}

#[test]
fn tape_cast_rounds_forward_and_passes_the_gradient_back_in_the_input_dtype() {
    // y = 3 · f32(bf16(x)): the value is x rounded to bf16, dy/dx = 3 (cast is the identity
    // for the gradient), and the gradient arrives in x's dtype.
    let be = Cpu;
    let mut tape = Tape::new(&be);
    let x = tape.param_owned(up(&[1.0 + 1.0 / 512.0, -2.5], &[2]));
    let h = tape.cast(x, DType::BF16).unwrap();
    assert_eq!(tape.value(h).dtype(), DType::BF16);
    let same = tape.cast(h, DType::BF16).unwrap();
    assert_eq!(same, h, "a cast to the value's own dtype records nothing");
    let f = tape.cast(h, DType::F32).unwrap();
    close(&be.to_vec_f32(tape.value(f)).unwrap(), &[1.0, -2.5], 0.0);
    let y = tape.scale(f, 3.0).unwrap();
    let g = tape.backward_with(y, up(&[1., 1.], &[2])).unwrap();
    let gx = g.get(x).unwrap();
    assert_eq!(gx.dtype(), DType::F32);
    close(&be.to_vec_f32(gx).unwrap(), &[3., 3.], 0.0);
}

#[test]
fn bf16_round_trip_rounds_to_nearest_even() {
    let be = Cpu;
    let x = up(&[1.0, 1.0 + 1.0 / 256.0, 3.0e38], &[3]);
    let back = be.to_vec_f32(&be.cast(&x, DType::BF16).unwrap()).unwrap();
    // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
    assert_eq!(back[0], 1.0);
    assert_eq!(back[1], 1.0);
    assert!((back[2] - 3.0e38).abs() / 3.0e38 < 1e-2);
}

#[test]
fn regression_cases() {
    // Once failed in CI: a one-column L2 normalisation with a row near zero (a step).
    run_all(
        CaseDims {
            rows: 3,
            cols: 1,
            inner: 5,
            vocab: 2,
        },
        16994530909228222752,
    )
    .unwrap();
    // Once failed: LayerNorm over two nearly equal values.
    run_all(
        CaseDims {
            rows: 4,
            cols: 2,
            inner: 6,
            vocab: 4,
        },
        13891334728838047101,
    )
    .unwrap();
}

#[test]
fn dropout_drops_about_p_and_rescales_the_rest() {
    let be = Cpu;
    let n = 20_000;
    let y = be
        .to_vec_f32(&be.dropout(&up(&vec![1.0; n], &[n]), 0.25, 9).unwrap())
        .unwrap();
    let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
    assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    // The mask is a function of (seed, index): the same call gives the same mask, another
    // seed another one.
    let again = be
        .to_vec_f32(&be.dropout(&up(&vec![1.0; n], &[n]), 0.25, 9).unwrap())
        .unwrap();
    assert_eq!(y, again);
    let other = be
        .to_vec_f32(&be.dropout(&up(&vec![1.0; n], &[n]), 0.25, 10).unwrap())
        .unwrap();
    assert_ne!(y, other);
}
