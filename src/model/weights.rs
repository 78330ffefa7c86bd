//! Model weights: finding each tensor of a published directory by name (with or without the
//! `roberta.` / `bert.` prefix), checking its shape, and uploading it to a backend.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};

use super::checkpoint::{read_checkpoint, HostTensor};
use super::config::Config;
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

/// A linear layer `y = x Wᵀ + b`. The weight is kept transposed, `Wᵀ` `[in, out]`, so the
/// product is a plain `x · Wᵀ`: the CPU GEMM runs the wide FFN projection about a fifth
/// faster with a row-major right operand than with PyTorch's `[out, in]` (measured with
/// the `gemm` crate at 2048×4096×1024 on 2 threads: 156 vs 121 GFLOP/s).
pub struct Linear<B: Backend> {
    /// Transposed weight `[in, out]`.
    pub wt: Tensor<B>,
    /// Bias `[out]`.
    pub b: Tensor<B>,
}

/// LayerNorm gain and shift.
pub struct Norm<B: Backend> {
    /// Gain `[hidden]`.
    pub g: Tensor<B>,
    /// Shift `[hidden]`.
    pub b: Tensor<B>,
}

/// One transformer layer (post-LayerNorm, as BERT and XLM-R).
pub struct Layer<B: Backend> {
    /// Query projection.
    pub q: Linear<B>,
    /// Key projection.
    pub k: Linear<B>,
    /// Value projection.
    pub v: Linear<B>,
    /// Attention output projection.
    pub attn_out: Linear<B>,
    /// LayerNorm after the attention residual.
    pub attn_norm: Norm<B>,
    /// FFN up projection.
    pub ffn_in: Linear<B>,
    /// FFN down projection.
    pub ffn_out: Linear<B>,
    /// LayerNorm after the FFN residual.
    pub ffn_norm: Norm<B>,
}

/// The encoder's weights.
pub struct EncoderWeights<B: Backend> {
    /// Word embeddings `[vocab, hidden]`.
    pub word: Tensor<B>,
    /// Position embeddings `[max_positions, hidden]`.
    pub position: Tensor<B>,
    /// Token-type row 0 `[1, hidden]` (every token is type 0).
    pub token_type0: Tensor<B>,
    /// Embedding LayerNorm.
    pub emb_norm: Norm<B>,
    /// Transformer layers.
    pub layers: Vec<Layer<B>>,
}

struct Loader<'a, B: Backend> {
    be: &'a B,
    file: &'a mut TensorFile,
    dtype: DType,
}

impl<B: Backend> Loader<'_, B> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor<B>> {
        let t = self.file.take(name, shape)?;
        upload(self.be, t, self.dtype).with_context(|| format!("uploading {name}"))
    }
    fn linear(&mut self, name: &str, out: usize, inp: usize) -> anyhow::Result<Linear<B>> {
        let w = self.file.take(&format!("{name}.weight"), &[out, inp])?;
        Ok(Linear {
            wt: upload(self.be, transpose(w), self.dtype)
                .with_context(|| format!("uploading {name}.weight"))?,
            b: self.tensor(&format!("{name}.bias"), &[out])?,
        })
    }
    fn norm(&mut self, name: &str, n: usize) -> anyhow::Result<Norm<B>> {
        Ok(Norm {
            g: self.tensor(&format!("{name}.weight"), &[n])?,
            b: self.tensor(&format!("{name}.bias"), &[n])?,
        })
    }
}

impl<B: Backend> EncoderWeights<B> {
    /// Every weight with its HF name (linear weights are stored transposed, `[in, out]`),
    /// in the order [`crate::model::encoder::EncoderVars::all`] lists their tape values.
    pub fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor<B>)> {
        let mut v: Vec<(String, &mut Tensor<B>)> = vec![
            ("embeddings.word_embeddings.weight".into(), &mut self.word),
            (
                "embeddings.position_embeddings.weight".into(),
                &mut self.position,
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                &mut self.token_type0,
            ),
            ("embeddings.LayerNorm.weight".into(), &mut self.emb_norm.g),
            ("embeddings.LayerNorm.bias".into(), &mut self.emb_norm.b),
        ];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}");
            for (name, lin) in [
                ("attention.self.query", &mut l.q),
                ("attention.self.key", &mut l.k),
                ("attention.self.value", &mut l.v),
                ("attention.output.dense", &mut l.attn_out),
            ] {
                v.push((format!("{p}.{name}.weight"), &mut lin.wt));
                v.push((format!("{p}.{name}.bias"), &mut lin.b));
            }
            v.push((
                format!("{p}.attention.output.LayerNorm.weight"),
                &mut l.attn_norm.g,
            ));
            v.push((
                format!("{p}.attention.output.LayerNorm.bias"),
                &mut l.attn_norm.b,
            ));
            v.push((format!("{p}.intermediate.dense.weight"), &mut l.ffn_in.wt));
            v.push((format!("{p}.intermediate.dense.bias"), &mut l.ffn_in.b));
            v.push((format!("{p}.output.dense.weight"), &mut l.ffn_out.wt));
            v.push((format!("{p}.output.dense.bias"), &mut l.ffn_out.b));
            v.push((format!("{p}.output.LayerNorm.weight"), &mut l.ffn_norm.g));
            v.push((format!("{p}.output.LayerNorm.bias"), &mut l.ffn_norm.b));
        }
        v
    }

    /// Loads the encoder from a checkpoint file, compute weights in `dtype`.
    pub fn load(be: &B, file: &mut TensorFile, c: &Config, dtype: DType) -> anyhow::Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut ld = Loader { be, file, dtype };
        let word = ld.tensor("embeddings.word_embeddings.weight", &[c.vocab_size, h])?;
        let position = ld.tensor(
            "embeddings.position_embeddings.weight",
            &[c.max_position_embeddings, h],
        )?;
        let types = ld.file.take(
            "embeddings.token_type_embeddings.weight",
            &[c.type_vocab_size, h],
        )?;
        let token_type0 = upload(
            be,
            HostTensor {
                shape: vec![1, h],
                data: types.data[..h].to_vec(),
            },
            dtype,
        )?;
        let emb_norm = ld.norm("embeddings.LayerNorm", h)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                q: ld.linear(&format!("{p}.attention.self.query"), h, h)?,
                k: ld.linear(&format!("{p}.attention.self.key"), h, h)?,
                v: ld.linear(&format!("{p}.attention.self.value"), h, h)?,
                attn_out: ld.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: ld.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                ffn_in: ld.linear(&format!("{p}.intermediate.dense"), i, h)?,
                ffn_out: ld.linear(&format!("{p}.output.dense"), h, i)?,
                ffn_norm: ld.norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        Ok(EncoderWeights {
            word,
            position,
            token_type0,
            emb_norm,
            layers,
        })
    }
}

/// Loads a head file (`colbert_linear.pt`, `sparse_linear.pt`, or `.safetensors`) as a
/// [`Linear`] with `out` rows over `hidden`; `None` when neither file exists.
pub fn load_head<B: Backend>(
    be: &B,
    dir: &Path,
    stem: &str,
    out: Option<usize>,
    hidden: usize,
    dtype: DType,
) -> anyhow::Result<Option<Linear<B>>> {
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
    let w = f.take("weight", &[out, hidden])?;
    let mut ld = Loader {
        be,
        file: &mut f,
        dtype,
    };
    Ok(Some(Linear {
        wt: upload(be, transpose(w), dtype)?,
        b: ld.tensor("bias", &[out])?,
    }))
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
