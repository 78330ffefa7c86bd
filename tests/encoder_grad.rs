//! The encoder on the tape: its forward equals the inference forward, and its gradients
//! with respect to every weight of a tiny random model match finite differences.

use std::path::Path;

use m3::autograd::{Tape, Var};
use m3::backend::cpu::Cpu;
use m3::backend::Backend;
use m3::batch::pack;
use m3::gradcheck::{check, Input, Tolerance};
use m3::model::config::Config;
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::model::encoder::{forward_taped, Dropout, EncoderVars, LayerVars, LinearVars, NormVars};
use m3::rng::Rng;
use m3::DType;

#[test]
fn taped_forward_equals_inference_forward() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3");
    let m = Embedder::load(&Cpu, &dir, DType::F32).unwrap();
    let opts = EncodeOptions::default();
    let texts = [
        "a short one",
        "and a somewhat longer second text for the batch",
    ];
    let enc: Vec<_> = texts
        .iter()
        .map(|t| m.tokenize(t, &opts).unwrap())
        .collect();
    let batch = pack(&enc, 1 << 20, m.config.position_offset()).remove(0);
    let want = Cpu.to_vec_f32(&m.forward(&Cpu, &batch).unwrap()).unwrap();
    // Re-load the weights to record them (the embedder keeps its own private copy).
    let mut file = m3::model::weights::TensorFile::open(&dir.join("model.safetensors")).unwrap();
    let w =
        m3::model::weights::EncoderWeights::load(&Cpu, &mut file, &m.config, DType::F32).unwrap();
    let mut tape = Tape::new(&Cpu);
    let vars = EncoderVars::record(&mut tape, &w);
    let out = forward_taped(&mut tape, &vars, &m.config, &batch, &Dropout::OFF).unwrap();
    let got = Cpu.to_vec_f32(tape.value(out)).unwrap();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

const H: usize = 8;
const I: usize = 12;
const V: usize = 10;
const P: usize = 12;

fn tiny_config(layers: usize) -> Config {
    serde_json::from_value(serde_json::json!({
        "model_type": "xlm-roberta", "vocab_size": V, "hidden_size": H, "num_hidden_layers": layers,
        "num_attention_heads": 2, "intermediate_size": I, "max_position_embeddings": P,
        "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1, "hidden_act": "gelu"
    }))
    .unwrap()
}

/// All weights of a tiny random encoder, in the order `vars_from` reads them.
fn tiny_inputs(rng: &mut Rng, layers: usize) -> Vec<Input> {
    let mut v = Vec::new();
    let mut push = |rng: &mut Rng, shape: &[usize], lo: f32, hi: f32| {
        let n = shape.iter().product();
        v.push(Input::Float {
            shape: shape.to_vec(),
            data: rng.vec(n, lo, hi),
            grad: true,
        });
    };
    push(rng, &[V, H], -1.0, 1.0);
    push(rng, &[P, H], -1.0, 1.0);
    push(rng, &[1, H], -1.0, 1.0);
    push(rng, &[H], 0.5, 1.5);
    push(rng, &[H], -0.2, 0.2);
    let s = 1.0 / (H as f32).sqrt();
    for _ in 0..layers {
        for (i, o) in [(H, H), (H, H), (H, H), (H, H)] {
            push(rng, &[i, o], -s, s);
            push(rng, &[o], -0.1, 0.1);
        }
        push(rng, &[H], 0.5, 1.5);
        push(rng, &[H], -0.2, 0.2);
        push(rng, &[H, I], -s, s);
        push(rng, &[I], -0.1, 0.1);
        push(rng, &[I, H], -s, s);
        push(rng, &[H], -0.1, 0.1);
        push(rng, &[H], 0.5, 1.5);
        push(rng, &[H], -0.2, 0.2);
    }
    v
}

fn vars_from(v: &[Var], layers: usize) -> EncoderVars {
    let lin = |i: usize| LinearVars {
        wt: v[i],
        b: v[i + 1],
    };
    let norm = |i: usize| NormVars {
        g: v[i],
        b: v[i + 1],
    };
    EncoderVars {
        word: v[0],
        position: v[1],
        token_type0: v[2],
        emb_norm: norm(3),
        layers: (0..layers)
            .map(|l| {
                let o = 5 + l * 16;
                LayerVars {
                    q: lin(o),
                    k: lin(o + 2),
                    v: lin(o + 4),
                    attn_out: lin(o + 6),
                    attn_norm: norm(o + 8),
                    ffn_in: lin(o + 10),
                    ffn_out: lin(o + 12),
                    ffn_norm: norm(o + 14),
                }
            })
            .collect(),
    }
}

#[test]
fn whole_encoder_gradients_match_finite_differences() {
    let layers = 2;
    let config = tiny_config(layers);
    let texts = [
        m3::text::Encoded {
            ids: vec![0, 4, 7, 2],
            cls_positions: vec![0],
            truncated: false,
        },
        m3::text::Encoded {
            ids: vec![0, 5, 5, 9, 3, 2],
            cls_positions: vec![0],
            truncated: false,
        },
    ];
    let batch = pack(&texts, 64, config.position_offset()).remove(0);
    for seed in [1u64, 2] {
        let inputs = tiny_inputs(&mut Rng::new(seed), layers);
        let (c, b) = (config.clone(), batch.clone());
        let f = move |t: &mut Tape<'_, Cpu>, v: &[Var]| {
            forward_taped(t, &vars_from(v, layers), &c, &b, &Dropout::OFF)
        };
        let reports = check(&Cpu, &inputs, &f, Tolerance::default(), seed).unwrap();
        assert_eq!(reports.len(), inputs.len());
        for r in reports {
            assert!(
                r.worst_ratio <= 1.0,
                "seed {seed}: weight #{} off: {r:?}",
                r.input
            );
        }
    }
}

#[test]
fn batch_loss_gradients_match_finite_differences() {
    use m3::batch::pack_in_order;
    use m3::text::Encoded;
    use m3::train::loss::{KdLoss, LossConfig};
    let layers = 1;
    let config = tiny_config(layers);
    let seq = |ids: &[u32]| Encoded {
        ids: ids.to_vec(),
        cls_positions: vec![0],
        truncated: false,
    };
    // Two queries, two passages each (positive first); no id repeats within a sequence, so
    // the lexical scatter-max has no ties.
    let q = pack_in_order(
        &[seq(&[0, 4, 7, 2]), seq(&[0, 5, 9, 2])],
        config.position_offset(),
    );
    let p = pack_in_order(
        &[
            seq(&[0, 4, 6, 7, 2]),
            seq(&[0, 8, 3, 2]),
            seq(&[0, 5, 9, 6, 2]),
            seq(&[0, 7, 4, 2]),
        ],
        config.position_offset(),
    );
    // Plain in-batch negatives; each query's own group with KL teacher terms; the masked
    // per-passage teacher loss. (No self-distillation here: finite differences would move
    // the teacher, which the analytic gradient rightly treats as a constant.)
    let teacher = vec![0.9, -0.4, 0.2, 0.5];
    let base = LossConfig {
        temperature: 0.5,
        group: 2,
        dense_only: false,
        self_distill: false,
        excluded: vec![0, 1, 2, 3],
        in_batch_neg: true,
        teacher: None,
        masked_columns: Vec::new(),
    };
    let configs = [
        base.clone(),
        LossConfig {
            in_batch_neg: false,
            teacher: Some((teacher.clone(), KdLoss::KlDiv)),
            ..base.clone()
        },
        LossConfig {
            teacher: Some((teacher, KdLoss::M3KdLoss)),
            ..base
        },
    ];
    for (k, cfg) in configs.into_iter().enumerate() {
        batch_loss_case(&config, layers, &q, &p, cfg, k);
    }
}

fn batch_loss_case(
    config: &Config,
    layers: usize,
    q: &m3::batch::PackedBatch,
    p: &m3::batch::PackedBatch,
    cfg: m3::train::loss::LossConfig,
    case: usize,
) {
    use m3::train::forward::{batch_loss, HeadVars};
    let (config, q, p) = (config.clone(), q.clone(), p.clone());
    let mut rng = Rng::new(5);
    let mut inputs = tiny_inputs(&mut rng, layers);
    let n_enc = inputs.len();
    let s = 1.0 / (H as f32).sqrt();
    for (shape, lo, hi) in [
        (vec![H, 1], -s, s),
        (vec![1], 0.5, 0.6),
        (vec![H, 6], -s, s),
        (vec![6], -0.1, 0.1),
    ] {
        let n = shape.iter().product();
        inputs.push(Input::Float {
            shape,
            data: rng.vec(n, lo, hi),
            grad: true,
        });
    }
    let f = move |t: &mut Tape<'_, Cpu>, v: &[Var]| {
        let enc = vars_from(v, layers);
        let heads = HeadVars {
            sparse: LinearVars {
                wt: v[n_enc],
                b: v[n_enc + 1],
            },
            colbert: LinearVars {
                wt: v[n_enc + 2],
                b: v[n_enc + 3],
            },
        };
        // Dropout on the passages in the first case: its masks are fixed by the seed, so
        // finite differences see the same mask and check the hidden-dropout placement.
        let dq = Dropout::OFF;
        let dp = Dropout {
            p: if case == 0 { 0.2 } else { 0.0 },
            seed: 9,
            token_offset: 3,
        };
        Ok(batch_loss(t, &enc, &heads, &config, &q, &p, &cfg, [&dq, &dp])?.0)
    };
    let reports = check(&Cpu, &inputs, &f, Tolerance::default(), 5).unwrap();
    for r in reports {
        assert!(
            r.worst_ratio <= 1.0,
            "case {case}: weight #{} off: {r:?}",
            r.input
        );
    }
}
