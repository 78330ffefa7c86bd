//! The model being trained: the encoder and both heads as compute tensors on a backend, the
//! f32 master copy the optimiser updates, and the published directory layout it is read
//! from and written back to (model.safetensors, head files, config, tokenizer).

use std::path::Path;

use crate::autograd::{Tape, Var};
use crate::backend::Backend;
use crate::model::config::Config;
use crate::model::params::{Heads, Held, Linear, Spec, Trainable, Tree};
use crate::model::weights::{load_head, weights_file, EncoderWeights, LinearWeights, TensorFile};
use crate::rng::Rng;
use crate::tensor::{DType, HostData, Tensor};

/// Files of a model directory copied unchanged into every checkpoint.
pub const SIDE_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
];

/// One trainable tensor's f32 master copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Master {
    /// HF name (`encoder.layer.0.attention.self.query.weight`, `colbert_linear.bias`, ...).
    pub name: String,
    /// Shape as m3 holds it (linear weights transposed, `[in, out]`).
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
    /// How m3 holds it relative to the checkpoint (from the parameter tree's declaration).
    pub held: Held,
}

impl Master {
    /// Shape and values in PyTorch's layout.
    pub fn torch_layout(&self) -> (Vec<usize>, Vec<f32>) {
        if self.held != Held::Transposed {
            return (self.shape.clone(), self.data.clone());
        }
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = self.data[i * c + j];
            }
        }
        (vec![c, r], out)
    }
}

/// The encoder and heads in compute precision on a backend, plus the token-type rows m3
/// does not use (kept so a checkpoint writes the table back whole).
pub struct TrainModel<B: Backend> {
    /// `config.json`.
    pub config: Config,
    /// The encoder and both heads.
    pub params: Trainable<Tensor<B>>,
    /// Rows 1.. of the token-type table, unchanged by training.
    pub token_type_rest: Vec<f32>,
    /// Tensors of the checkpoint m3 does not use (e.g. the pooler), written back unchanged.
    pub untouched: Vec<(String, crate::model::checkpoint::HostTensor)>,
}

/// A head as `torch.nn.Linear` initialises one (`U(-1/√in, 1/√in)` for weight and bias),
/// for model directories that have no head file yet (a base model).
fn random_head<B: Backend>(
    be: &B,
    inp: usize,
    out: usize,
    rng: &mut Rng,
    dtype: DType,
) -> anyhow::Result<LinearWeights<B>> {
    let bound = 1.0 / (inp as f32).sqrt();
    let wt = rng.vec(inp * out, -bound, bound);
    let b = rng.vec(out, -bound, bound);
    Ok(Linear {
        wt: be.cast(&be.upload(HostData::F32(&wt), &[inp, out])?, dtype)?,
        b: be.cast(&be.upload(HostData::F32(&b), &[out])?, dtype)?,
    })
}

impl<B: Backend> TrainModel<B> {
    /// Loads a model directory; a missing head is initialised as PyTorch would, from `seed`.
    pub fn load(be: &B, dir: &Path, dtype: DType, seed: u64) -> anyhow::Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let weights = weights_file(dir)?;
        let mut file = TensorFile::open(&weights)?;
        let h = config.hidden_size;
        let types = file
            .peek("embeddings.token_type_embeddings.weight")
            .map(|t| t.data[h.min(t.data.len())..].to_vec())
            .unwrap_or_default();
        let encoder = EncoderWeights::load(be, &mut file, &config, dtype)?;
        let untouched = file.into_rest();
        let mut rng = Rng::new(seed ^ 0x4845_4144);
        let sparse = match load_head(be, dir, "sparse_linear", Some(1), h, dtype)? {
            Some(l) => l,
            None => random_head(be, h, 1, &mut rng, dtype)?,
        };
        let colbert = match load_head(be, dir, "colbert_linear", None, h, dtype)? {
            Some(l) => l,
            None => random_head(be, h, h, &mut rng, dtype)?,
        };
        Ok(TrainModel {
            config,
            params: Trainable {
                encoder,
                heads: Heads { sparse, colbert },
            },
            token_type_rest: types,
            untouched,
        })
    }

    /// Every trainable tensor with its HF name, in the parameter tree's order.
    pub fn named_mut(&mut self) -> Vec<(String, &mut Tensor<B>)> {
        self.params.named_mut()
    }

    /// The parameter tree's declaration for this model (checkpoint shapes, how each is held).
    pub fn spec(&self) -> Trainable<Spec> {
        let colbert_dim = self.params.heads.colbert.b.shape()[0];
        Trainable::spec(&self.config, colbert_dim)
    }

    /// How each trainable tensor is held, in the parameter tree's order.
    pub fn held(&self) -> Vec<Held> {
        self.spec()
            .named()
            .into_iter()
            .map(|(_, s)| s.held)
            .collect()
    }

    /// The f32 master copy of every trainable tensor.
    pub fn masters(&mut self, be: &B) -> anyhow::Result<Vec<Master>> {
        let held = self.held();
        self.named_mut()
            .into_iter()
            .zip(held)
            .map(|((name, t), held)| {
                Ok(Master {
                    shape: t.shape().to_vec(),
                    data: be.to_vec_f32(t)?,
                    name,
                    held,
                })
            })
            .collect()
    }

    /// Casts every compute tensor to `dtype` (bf16 compute copies on a GPU).
    pub fn cast(&mut self, be: &B, dtype: DType) -> anyhow::Result<()> {
        for (_, t) in self.named_mut() {
            *t = be.cast(t, dtype)?;
        }
        Ok(())
    }

    /// Records every weight on a tape as a borrowed parameter.
    pub fn record<'a>(&'a self, t: &mut Tape<'a, B>) -> TrainVars {
        self.params.map(|_, x| t.param(x))
    }
}

/// The model's weights on one tape; [`Trainable::all`] lists them in the order of
/// [`TrainModel::named_mut`].
pub type TrainVars = Trainable<Var>;

/// The heads' weights on the tape.
pub type HeadVars = Heads<Var>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::model::random::write_random_model;

    #[test]
    fn the_declared_spec_matches_the_loaded_tensors_and_gives_torch_shapes_back() {
        let json = serde_json::json!({
            "model_type": "xlm-roberta", "vocab_size": 11, "hidden_size": 4,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 6,
            "max_position_embeddings": 12, "type_vocab_size": 2, "layer_norm_eps": 1e-5,
            "pad_token_id": 1, "hidden_act": "gelu"
        });
        let c: Config = serde_json::from_value(json.clone()).unwrap();
        let dir = std::env::temp_dir().join(format!("m3-train-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        write_random_model(&dir, &c, 7).unwrap();
        let mut model = TrainModel::load(&Cpu, &dir, DType::F32, 1).unwrap();
        let spec = model.spec();
        let masters = model.masters(&Cpu).unwrap();
        let declared = spec.named();
        assert_eq!(declared.len(), masters.len());
        let mut transposed = 0;
        for ((name, s), m) in declared.iter().zip(&masters) {
            assert_eq!(name, &m.name);
            assert_eq!(s.shape(), m.shape, "{name}: held shape");
            let (torch_shape, data) = m.torch_layout();
            let want = match s.held {
                Held::FirstRow => vec![1, s.stored[1]],
                _ => s.stored.clone(),
            };
            assert_eq!(torch_shape, want, "{name}: PyTorch shape");
            if s.held == Held::Transposed {
                transposed += 1;
                let (inp, out) = (m.shape[0], m.shape[1]);
                for (o, i) in [(0, inp - 1), (out - 1, 0), (out - 1, inp - 1)] {
                    let torch = data[o * inp + i];
                    assert_eq!(torch, m.data[i * out + o], "{name}: torch [{o}][{i}]");
                }
            }
        }
        // Six linear layers per encoder layer, plus the two heads.
        assert_eq!(transposed, 6 * 2 + 2);
        std::fs::remove_dir_all(&dir).ok();
    }
}
