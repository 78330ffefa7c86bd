//! Random model directories: BERT-style initialised weights for a config (benchmarks, the
//! demo's untrained starting point), heads initialised as `torch.nn.Linear` does.

use std::path::Path;

use super::checkpoint::write_safetensors;
use super::config::Config;
use crate::rng::Rng;

/// Every encoder tensor's HF name and shape (PyTorch layout) for `c`.
pub fn encoder_shapes(c: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![c.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![c.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![c.type_vocab_size, h],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            shapes.push((format!("{p}.{name}.weight"), vec![out, inp]));
            shapes.push((format!("{p}.{name}.bias"), vec![out]));
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}.{n}.weight"), vec![h]));
            shapes.push((format!("{p}.{n}.bias"), vec![h]));
        }
    }
    shapes
}

/// Writes `model.safetensors` (weights ~ U(-0.035, 0.035), std 0.02 as BERT initialises,
/// biases 0, LayerNorm gains 1) and `colbert_linear` / `sparse_linear` heads (U(±1/√hidden)) for the
/// config into `dir`, from `seed`.
pub fn write_random_model(dir: &Path, c: &Config, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng::new(seed);
    let shapes = encoder_shapes(c);
    let data: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            if name.ends_with("LayerNorm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                rng.vec(n, -0.035, 0.035)
            }
        })
        .collect();
    let tensors: Vec<(String, Vec<usize>, &[f32])> = shapes
        .iter()
        .zip(&data)
        .map(|((name, shape), v)| (name.clone(), shape.clone(), v.as_slice()))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let h = c.hidden_size;
    let bound = 1.0 / (h as f32).sqrt();
    for (stem, out) in [("colbert_linear", h), ("sparse_linear", 1)] {
        let w = rng.vec(out * h, -bound, bound);
        let b = rng.vec(out, -bound, bound);
        write_safetensors(
            &dir.join(format!("{stem}.safetensors")),
            &[
                ("weight".into(), vec![out, h], &w),
                ("bias".into(), vec![out], &b),
            ],
        )?;
    }
    Ok(())
}
