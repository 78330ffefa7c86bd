//! Training parity with FlagEmbedding 1.4.2: the loss, its parts and every parameter's
//! gradient of `EncoderOnlyEmbedderM3Model` on the fixture model (goldens from
//! `fixtures/make_train_golden.py`, fp32, dropout off).

use std::collections::HashMap;
use std::path::Path;

use m3::backend::cpu::Cpu;
use m3::batch::pack_in_order;
use m3::text::{Encoded, TextTokenizer};
use m3::train::arena::{GradArena, ParamLayout};
use m3::train::forward::{step_grads, RankLoss, StepBatch, StepDropout};
use m3::train::loss::{KdLoss, LossConfig};
use m3::train::model::{Master, TrainModel};
use m3::DType;
use serde_json::Value;

fn golden() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3-train-golden.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(got: f32, want: f64, what: &str) {
    // 1e-4 relative, with an absolute floor for parts that underflow to ~1e-40 at τ = 0.02.
    let tol = 1e-4 * want.abs() + 1e-6;
    assert!(
        (got as f64 - want).abs() <= tol,
        "{what}: m3 {got} vs FlagEmbedding {want}"
    );
}

#[test]
fn loss_and_gradients_match_flagembedding() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let g = golden();
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let st = &case["settings"];
        let (qi, pi) = (ids(&case["query_ids"]), ids(&case["passage_ids"]));
        // Our tokenizer gives FlagEmbedding's ids for every text.
        for (texts, want, max) in [
            (&case["queries"], &qi, st["query_max_len"].as_u64().unwrap()),
            (
                &case["passages"],
                &pi,
                st["passage_max_len"].as_u64().unwrap(),
            ),
        ] {
            for (t, w) in texts.as_array().unwrap().iter().zip(want) {
                let e = tok
                    .encode(t.as_str().unwrap(), max as usize, false)
                    .unwrap();
                assert_eq!(&e.ids, w, "{name}: tokens of {t}");
            }
        }
        let mut model = TrainModel::load(&Cpu, &dir, DType::F32, 0).unwrap();
        let layout = ParamLayout::of(&mut model);
        let off = model.config.position_offset();
        let enc = |v: &[Vec<u32>]| -> Vec<Encoded> {
            v.iter()
                .map(|ids| Encoded {
                    ids: ids.clone(),
                    cls_positions: vec![0],
                    truncated: false,
                })
                .collect()
        };
        let batch = StepBatch {
            q: pack_in_order(&enc(&qi), off),
            p: pack_in_order(&enc(&pi), off),
        };
        let sp = tok.specials;
        let mut cfg = LossConfig::new(
            st["group"].as_u64().unwrap() as usize,
            vec![sp.cls, sp.eos, sp.pad.unwrap(), sp.unk.unwrap()],
        );
        cfg.temperature = st["temperature"].as_f64().unwrap() as f32;
        cfg.dense_only = !st["unified"].as_bool().unwrap();
        cfg.self_distill = st["self_distill"].as_bool().unwrap();
        cfg.in_batch_neg = !st["no_in_batch_neg"].as_bool().unwrap();
        cfg.teacher = match st["kd_loss_type"].as_str() {
            Some("kl_div") => Some((floats(&case["teacher_scores"]), KdLoss::KlDiv)),
            Some("m3_kd_loss") => Some((floats(&case["teacher_scores"]), KdLoss::M3KdLoss)),
            None => None,
            Some(k) => panic!("{name}: unknown kd_loss_type {k}"),
        };
        let off_drop = StepDropout { p: 0.0, seed: 0 };
        let mut arena = GradArena::zeros(&Cpu, &layout).unwrap();
        let loss = step_grads(
            &Cpu,
            &model,
            &layout,
            &batch,
            &cfg,
            off_drop,
            None,
            &RankLoss::solo(),
            &mut arena,
        )
        .unwrap();
        let grads = arena.per_slot(&Cpu, &layout).unwrap();
        let parts = &case["parts"];
        let part = |k: &str| parts[k].as_f64().unwrap();
        close(loss.dense, part("dense"), &format!("{name}: dense"));
        if let Some([s, c, e]) = loss.unified {
            close(s, part("sparse"), &format!("{name}: sparse"));
            close(c, part("colbert"), &format!("{name}: colbert"));
            // FlagEmbedding's no-in-batch-negative ensemble term cuts the passages to B
            // rows, leaving a one-column CE that is always 0, and its self-distillation
            // teacher uniform (FlagEmbedding issue #1410); m3 scores the ensemble over the
            // group like every other term, so only the correct parts are compared there.
            if cfg.in_batch_neg {
                close(e, part("ensemble"), &format!("{name}: ensemble"));
            }
        }
        if !cfg.in_batch_neg && !cfg.dense_only {
            continue;
        }
        if let Some(d) = loss.distill {
            let want = (part("self_distill_dense")
                + 0.1 * part("self_distill_sparse")
                + part("self_distill_colbert"))
                / 3.0;
            close(d, want, &format!("{name}: self-distillation"));
        }
        close(
            loss.loss,
            case["loss"].as_f64().unwrap(),
            &format!("{name}: loss"),
        );
        // Gradients in PyTorch's layout, per tensor against its largest entry: 1e-4, tighter
        // than the 1e-3 asked (measured worst 2.3e-5). The key bias's exact gradient is 0
        // (softmax ignores a per-row constant), so its floor is the largest gradient anywhere.
        let masters = model.masters(&Cpu).unwrap();
        let want: HashMap<&str, &Value> = case["grads"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let global = want
            .values()
            .flat_map(|v| floats(&v["data"]))
            .fold(0f32, |m, x| m.max(x.abs()));
        let mut compared = 0;
        let mut worst_ratio = 0f32;
        for (m, gr) in masters.iter().zip(&grads) {
            let Some(w) = want.get(m.name.as_str()) else {
                assert!(gr.is_none(), "{name}: m3 has a gradient for {}", m.name);
                continue;
            };
            let ours = Master {
                name: m.name.clone(),
                shape: m.shape.clone(),
                data: gr.clone().unwrap(),
                held: m.held,
            };
            let (shape, data) = ours.torch_layout();
            let wshape: Vec<usize> = w["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(shape, wshape, "{name}: shape of {}", m.name);
            let wd = floats(&w["data"]);
            let mut scale = wd.iter().fold(0f32, |a, x| a.max(x.abs()));
            if m.name.ends_with("attention.self.key.bias") {
                scale = scale.max(1e-2 * global);
            }
            let worst = data
                .iter()
                .zip(&wd)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4 * scale,
                "{name}: gradient of {} off by {worst} (scale {scale})",
                m.name
            );
            compared += 1;
            worst_ratio = worst_ratio.max(worst / scale);
        }
        assert_eq!(
            compared,
            want.len(),
            "{name}: every golden gradient compared"
        );
        eprintln!(
            "{name}: loss {} vs {}; {compared} gradients, worst |diff|/scale {worst_ratio:.2e}",
            loss.loss, case["loss"]
        );
    }
}
