//! Model weights: finding each tensor of a published directory by name (with or without the
//! `roberta.` / `bert.` prefix), checking its shape, and uploading it to a backend as
//! the parameter tree (`params.rs`) says m3 holds it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};

use super::checkpoint::{read_checkpoint, HostTensor};
use super::config::Config;
use super::params::{Encoder, Held, Linear, Spec, Tree};
use crate::backend::Backend;
use crate::tensor::{DType, Tensor};

/// The encoder checkpoint of a model directory: `model.safetensors`, else
/// `pytorch_model.bin`.
pub fn weights_file(dir: &Path) -> anyhow::Result<PathBuf> {
    ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!(
                "{}: no model.safetensors or pytorch_model.bin",
                dir.display()
            )
        })
}

/// Tensors of one checkpoint file, looked up by name with the file kept for messages.
pub struct TensorFile {
    path: PathBuf,
    tensors: HashMap<String, HostTensor>,
}

impl TensorFile {
    /// Reads a safetensors or torch zip file.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(TensorFile {
            path: path.to_path_buf(),
            tensors: read_checkpoint(path)?,
        })
    }

    /// The stored key of tensor `name`, also tried with `roberta.` and `bert.` prefixes.
    fn key(&self, name: &str) -> Option<String> {
        [
            name.to_string(),
            format!("roberta.{name}"),
            format!("bert.{name}"),
        ]
        .into_iter()
        .find(|k| self.tensors.contains_key(k))
    }

    /// Tensor `name` (prefixes as [`TensorFile::take`]) without taking it.
    pub fn peek(&self, name: &str) -> Option<&HostTensor> {
        self.key(name).and_then(|k| self.tensors.get(&k))
    }

    /// Takes tensor `name` (also tried with `roberta.` and `bert.` prefixes), checking its
    /// shape; a missing tensor or a wrong shape names the tensor, the file and both shapes.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> anyhow::Result<HostTensor> {
        let key = self
            .key(name)
            .ok_or_else(|| anyhow!("{}: tensor {name} is missing", self.path.display()))?;
        let t = self.tensors.remove(&key).unwrap();
        if t.shape != shape {
            bail!(
                "{}: tensor {key} has shape {:?}, expected {:?}",
                self.path.display(),
                t.shape,
                shape
            );
        }
        Ok(t)
    }

    /// The tensors nobody took, named without a `roberta.` / `bert.` prefix, sorted by name
    /// (carried through unchanged when a trained model is written back).
    pub fn into_rest(self) -> Vec<(String, HostTensor)> {
        let mut v: Vec<(String, HostTensor)> = self
            .tensors
            .into_iter()
            .map(|(k, t)| {
                let k = k
                    .strip_prefix("roberta.")
                    .or_else(|| k.strip_prefix("bert."))
                    .map(str::to_string)
                    .unwrap_or(k);
                (k, t)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn upload<B: Backend>(be: &B, t: HostTensor, dtype: DType) -> anyhow::Result<Tensor<B>> {
    let f = be.upload_vec(t.data, &t.shape)?;
    Ok(if dtype == DType::F32 {
        f
    } else {
        be.cast(&f, dtype)?
    })
}

/// The transpose of a 2-D host tensor, built in bands of 64 output rows (each input row
/// gives 64 contiguous values, and the 64 output rows being filled stay in cache; a plain
/// column-order transpose of a 4096 × 1024 matrix misses the cache on every write), the
/// bands across threads.
fn transpose(t: HostTensor) -> HostTensor {
    use rayon::prelude::*;
    const TILE: usize = 64;
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut data = vec![0f32; r * c];
    if r * c > 0 {
        // Output row j holds input column j: split the output into bands of TILE rows.
        data.par_chunks_mut(TILE * r)
            .enumerate()
            .for_each(|(band, out)| {
                let j0 = band * TILE;
                let jn = out.len() / r;
                for i in 0..r {
                    let row = &t.data[i * c + j0..i * c + j0 + jn];
                    for (dj, &x) in row.iter().enumerate() {
                        out[dj * r + i] = x;
                    }
                }
            });
    }
    HostTensor {
        shape: vec![c, r],
        data,
    }
}

/// A linear layer's weights on a backend.
pub type LinearWeights<B> = Linear<Tensor<B>>;

/// The encoder's weights on a backend.
pub type EncoderWeights<B> = Encoder<Tensor<B>>;

/// Takes leaf `name` of `file` as `spec` says it is stored and uploads it as m3 holds it,
/// in `dtype`.
fn load_leaf<B: Backend>(
    be: &B,
    file: &mut TensorFile,
    name: &str,
    spec: &Spec,
    dtype: DType,
) -> anyhow::Result<Tensor<B>> {
    let t = file.take(name, &spec.stored)?;
    let t = match spec.held {
        Held::AsIs => t,
        Held::Transposed => transpose(t),
        Held::FirstRow => {
            let shape = spec.shape();
            HostTensor {
                data: t.data[..shape[1]].to_vec(),
                shape,
            }
        }
    };
    upload(be, t, dtype).with_context(|| format!("uploading {name}"))
}

/// Loads every leaf of `spec` from `file` (each named as the tree names it, under
/// `prefix`), compute weights in `dtype`.
pub fn load_tree<B: Backend, T: Tree<Spec>>(
    be: &B,
    file: &mut TensorFile,
    spec: &T,
    prefix: &str,
    dtype: DType,
) -> anyhow::Result<T::With<Tensor<B>>> {
    spec.try_map(prefix, &mut |name, s| load_leaf(be, file, &name, s, dtype))
}

impl<B: Backend> EncoderWeights<B> {
    /// Loads the encoder from a checkpoint file, compute weights in `dtype`.
    pub fn load(be: &B, file: &mut TensorFile, c: &Config, dtype: DType) -> anyhow::Result<Self> {
        load_tree(be, file, &Encoder::spec(c), "", dtype)
    }

    /// Readies every projection's weight for inference (`Backend::pack_weight`), so that
    /// batch after batch reuses it as it is instead of packing it for every product.
    pub fn pack_for_inference(&mut self, be: &B) -> crate::error::Result<()> {
        for l in &mut self.layers {
            for lin in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.attn_out,
                &mut l.ffn_in,
                &mut l.ffn_out,
            ] {
                be.pack_weight(&mut lin.wt)?;
            }
        }
        Ok(())
    }
}

/// Loads a head file (`colbert_linear.pt`, `sparse_linear.pt`, or `.safetensors`) as a
/// [`Linear`] with `out` outputs over `hidden`; `None` when neither file exists.
pub fn load_head<B: Backend>(
    be: &B,
    dir: &Path,
    stem: &str,
    out: Option<usize>,
    hidden: usize,
    dtype: DType,
) -> anyhow::Result<Option<LinearWeights<B>>> {
    let path = ["pt", "safetensors"]
        .iter()
        .map(|ext| dir.join(format!("{stem}.{ext}")))
        .find(|p| p.exists());
    let Some(path) = path else { return Ok(None) };
    let mut f = TensorFile::open(&path)?;
    // The colbert head's output size is the checkpoint's (colbert_dim); read it from the file.
    let out = match out {
        Some(o) => o,
        None => {
            let shape = &f
                .tensors
                .get("weight")
                .ok_or_else(|| anyhow!("{}: tensor weight is missing", path.display()))?
                .shape;
            match shape.as_slice() {
                [rows, _] if *rows > 0 => *rows,
                _ => bail!(
                    "{}: tensor weight has shape {shape:?}, expected [out, {hidden}] with \
                     out at least 1",
                    path.display()
                ),
            }
        }
    };
    Ok(Some(load_tree(
        be,
        &mut f,
        &Linear::spec(hidden, out),
        "",
        dtype,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banded_transpose_matches_the_definition() {
        for (r, c) in [(1, 1), (3, 200), (130, 70), (64, 128), (200, 3)] {
            let data: Vec<f32> = (0..r * c).map(|k| k as f32).collect();
            let t = transpose(HostTensor {
                shape: vec![r, c],
                data: data.clone(),
            });
            assert_eq!(t.shape, vec![c, r]);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t.data[j * r + i], data[i * c + j], "{r}x{c} at {i},{j}");
                }
            }
        }
    }
}
