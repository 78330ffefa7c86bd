//! Parity with FlagEmbedding on the tiny random M3 fixture (goldens made by
//! fixtures/make_fixtures.py with BGEM3FlagModel, fp32, CPU): tokenization, dense, lexical
//! weights and colbert vectors to 1e-4 absolute, compute_score to 1e-4 relative; and the
//! torch-zip copy of the encoder (bf16, `roberta.` prefix) against the safetensors one.

use std::path::{Path, PathBuf};

use m3::backend::cpu::Cpu;
use m3::model::checkpoint::read_checkpoint;
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::model::heads::Pooling;
use m3::score;
use m3::DType;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("tiny-m3-golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn model() -> Embedder<Cpu> {
    Embedder::load(&Cpu, &fixtures().join("tiny-m3"), DType::F32).unwrap()
}

#[test]
fn encode_matches_flagembedding() {
    let g = golden();
    let m = model();
    let records = g["records"].as_array().unwrap();
    let texts: Vec<&str> = records
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    let opts = EncodeOptions {
        max_length: g["max_length"].as_u64().unwrap() as usize,
        pooling: Pooling::Cls,
        batch_tokens: 100, // several packed batches of mixed lengths
        mcls: false,
        dense: true,
        sparse: true,
        colbert: true,
    };
    let out = m.encode(&Cpu, &texts, &opts, &mut |_| {}).unwrap();
    assert!(out.truncated >= 1, "the long text must be truncated");
    for (i, (r, e)) in records.iter().zip(&out.embeddings).enumerate() {
        let ids: Vec<u32> = r["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            m.tokenize(texts[i], &opts).unwrap().ids,
            ids,
            "tokens of text {i} {:?}",
            texts[i]
        );
        let d = max_abs(e.dense.as_ref().unwrap(), &floats(&r["dense_vecs"]));
        assert!(d <= 1e-4, "dense of text {i}: max abs diff {d}");
        let want: Vec<(u32, f32)> = {
            let mut v: Vec<(u32, f32)> = r["lexical_weights"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.parse().unwrap(), v.as_f64().unwrap() as f32))
                .collect();
            v.sort_by_key(|p| p.0);
            v
        };
        let got = e.lexical.as_ref().unwrap();
        assert_eq!(
            got.iter().map(|p| p.0).collect::<Vec<_>>(),
            want.iter().map(|p| p.0).collect::<Vec<_>>(),
            "lexical ids of text {i}"
        );
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a.1 - b.1).abs() <= 1e-4,
                "lexical weight of token {} in text {i}: {} vs {}",
                a.0,
                a.1,
                b.1
            );
        }
        let want_c: Vec<Vec<f32>> = r["colbert_vecs"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let got_c = e.colbert.as_ref().unwrap();
        assert_eq!(got_c.len(), want_c.len(), "colbert rows of text {i}");
        for (a, b) in got_c.iter().zip(&want_c) {
            let d = max_abs(a, b);
            assert!(d <= 1e-4, "colbert of text {i}: max abs diff {d}");
        }
    }
}

#[test]
fn scores_match_flagembedding() {
    let g = golden();
    let m = model();
    let s = &g["score"];
    let w = floats(&s["weights"]);
    let weights = score::Weights {
        dense: w[0],
        sparse: w[1],
        colbert: w[2],
    };
    let opts = |key: &str| EncodeOptions {
        max_length: s[key].as_u64().unwrap() as usize,
        colbert: true,
        ..EncodeOptions::default()
    };
    for (i, pair) in s["pairs"].as_array().unwrap().iter().enumerate() {
        let q = &m
            .encode(
                &Cpu,
                &[pair["query"].as_str().unwrap()],
                &opts("query_max_length"),
                &mut |_| {},
            )
            .unwrap()
            .embeddings[0];
        let p = &m
            .encode(
                &Cpu,
                &[pair["passage"].as_str().unwrap()],
                &opts("passage_max_length"),
                &mut |_| {},
            )
            .unwrap()
            .embeddings[0];
        let got = score::combine(
            score::dense(q.dense.as_ref().unwrap(), p.dense.as_ref().unwrap()),
            score::lexical(q.lexical.as_ref().unwrap(), p.lexical.as_ref().unwrap()),
            score::colbert(q.colbert.as_ref().unwrap(), p.colbert.as_ref().unwrap()),
            weights,
        );
        for (key, v) in [
            ("dense", got.dense),
            ("sparse", got.sparse),
            ("colbert", got.colbert),
            ("sparse+dense", got.sparse_dense),
            ("colbert+sparse+dense", got.all),
        ] {
            let want = pair[key].as_f64().unwrap() as f32;
            let rel = (v - want).abs() / want.abs().max(1e-3);
            assert!(rel <= 1e-4, "pair {i} {key}: {v} vs {want} (rel {rel:.2e})");
        }
    }
}

#[test]
fn torch_zip_bf16_prefixed_checkpoint_matches_safetensors() {
    let st = read_checkpoint(&fixtures().join("tiny-m3/model.safetensors")).unwrap();
    let pt = read_checkpoint(&fixtures().join("tiny-m3/alt/pytorch_model.bin")).unwrap();
    assert_eq!(st.len(), pt.len());
    for (name, t) in &st {
        let p = pt
            .get(&format!("roberta.{name}"))
            .unwrap_or_else(|| panic!("{name} missing from the torch zip"));
        assert_eq!(p.shape, t.shape, "{name}");
        for (a, b) in p.data.iter().zip(&t.data) {
            // bf16 keeps 8 significant bits: relative error at most 2^-9.
            assert!(
                (a - b).abs() <= b.abs() * 2f32.powi(-8) + 1e-30,
                "{name}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn heads_missing_is_an_error_not_random_heads() {
    let dir = std::env::temp_dir().join(format!("m3-nohead-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixtures().join("tiny-m3").join(f), dir.join(f)).unwrap();
    }
    let m = Embedder::load(&Cpu, &dir, DType::F32).unwrap();
    let dense_only = EncodeOptions {
        sparse: false,
        ..EncodeOptions::default()
    };
    assert!(m.encode(&Cpu, &["hello"], &dense_only, &mut |_| {}).is_ok());
    let err = m
        .encode(&Cpu, &["hello"], &EncodeOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("sparse_linear"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mcls_dense_is_the_normalised_mean_of_the_cls_states() {
    use m3::backend::Backend;
    let m = model();
    let long = golden()["records"][2]["text"].as_str().unwrap().repeat(8);
    let opts = EncodeOptions {
        mcls: true,
        max_length: 1024,
        sparse: false,
        colbert: true,
        ..EncodeOptions::default()
    };
    let enc = m.tokenize(&long, &opts).unwrap();
    assert!(
        enc.cls_positions.len() >= 3,
        "{} CLS",
        enc.cls_positions.len()
    );
    let got = m
        .encode(&Cpu, &[long.as_str()], &opts, &mut |_| {})
        .unwrap()
        .embeddings
        .remove(0);
    // By hand: the encoder's states at every CLS position, averaged, normalised.
    let batch = m3::batch::pack(
        std::slice::from_ref(&enc),
        1 << 20,
        m.config.position_offset(),
    )
    .remove(0);
    let h = Cpu.to_vec_f32(&m.forward(&Cpu, &batch).unwrap()).unwrap();
    let d = m.config.hidden_size;
    let mut mean = vec![0f32; d];
    for &p in &enc.cls_positions {
        for c in 0..d {
            mean[c] += h[p * d + c] / enc.cls_positions.len() as f32;
        }
    }
    let n = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
    let want: Vec<f32> = mean.iter().map(|x| x / n).collect();
    assert!(max_abs(got.dense.as_ref().unwrap(), &want) < 1e-5);
    // Colbert skips every inserted CLS: one row per token but the CLS tokens.
    assert_eq!(
        got.colbert.unwrap().len(),
        enc.ids.len() - enc.cls_positions.len()
    );
    // Without MCLS the same text has a different (single-CLS) dense vector.
    let plain = EncodeOptions {
        mcls: false,
        ..opts
    };
    let single = m
        .encode(&Cpu, &[long.as_str()], &plain, &mut |_| {})
        .unwrap()
        .embeddings
        .remove(0);
    assert!(max_abs(single.dense.as_ref().unwrap(), &want) > 1e-3);
}
