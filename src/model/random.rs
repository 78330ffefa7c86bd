//! Random model directories: BERT-style initialised weights for a config (benchmarks, the
//! demo's untrained starting point), heads initialised as `torch.nn.Linear` does.

use std::path::Path;

use super::checkpoint::write_safetensors;
use super::config::Config;
use super::params::{Encoder, Tree};
use crate::rng::Rng;

/// Every encoder tensor's HF name and shape (PyTorch layout) for `c`, in the parameter
/// tree's order.
pub fn encoder_shapes(c: &Config) -> Vec<(String, Vec<usize>)> {
    Encoder::spec(c)
        .named()
        .into_iter()
        .map(|(name, s)| (name, s.stored.clone()))
        .collect()
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
