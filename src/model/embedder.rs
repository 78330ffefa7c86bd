//! A loaded model directory (BAAI's bge-m3 layout, or a BERT-family sentence-transformers
//! directory) and the encode pipeline: tokenize, pack, encode, heads, back to input order.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::config::Config;
use super::encoder;
use super::heads::{self, Pooling};
use super::weights::{load_head, weights_file, EncoderWeights, LinearWeights, TensorFile};
use crate::backend::Backend;
use crate::batch::pack;
use crate::tensor::DType;
use crate::text::{Encoded, TextTokenizer};

/// What to compute for each text.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// Tokens per text, special tokens (and MCLS's inserted CLS) included.
    pub max_length: usize,
    /// Dense pooling.
    pub pooling: Pooling,
    /// Token budget of one packed batch.
    pub batch_tokens: usize,
    /// Multi-CLS for long texts (SPEC §3).
    pub mcls: bool,
    /// Compute dense vectors.
    pub dense: bool,
    /// Compute lexical weights (needs the sparse head).
    pub sparse: bool,
    /// Compute colbert vectors (needs the colbert head).
    pub colbert: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            max_length: 8192,
            pooling: Pooling::Cls,
            batch_tokens: 16384,
            mcls: false,
            dense: true,
            sparse: true,
            colbert: false,
        }
    }
}

impl EncodeOptions {
    /// Dense, lexical and colbert outputs (what scoring and search need), CLS pooling.
    pub fn all_outputs(max_length: usize, batch_tokens: usize) -> Self {
        EncodeOptions {
            max_length,
            batch_tokens,
            colbert: true,
            ..EncodeOptions::default()
        }
    }
}

/// The outputs for one text; absent ones were not requested.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embedding {
    /// Normalised dense vector.
    pub dense: Option<Vec<f32>>,
    /// `(token id, weight)` sorted by id.
    pub lexical: Option<Vec<(u32, f32)>>,
    /// Normalised colbert vectors, one per non-CLS token.
    pub colbert: Option<Vec<Vec<f32>>>,
}

/// Embeddings in input order, and how many texts were truncated.
#[derive(Debug, Clone)]
pub struct EncodeResult {
    /// One per input text.
    pub embeddings: Vec<Embedding>,
    /// Texts cut to fit `max_length`.
    pub truncated: usize,
}

/// A model directory loaded onto a backend.
pub struct Embedder<B: Backend> {
    /// `config.json`.
    pub config: Config,
    /// The tokenizer and its special tokens.
    pub tokenizer: TextTokenizer,
    encoder: EncoderWeights<B>,
    colbert_head: Option<LinearWeights<B>>,
    sparse_head: Option<LinearWeights<B>>,
    dir: PathBuf,
}

impl<B: Backend> Embedder<B> {
    /// Loads `config.json`, `tokenizer.json`, `model.safetensors` (or `pytorch_model.bin`)
    /// and, where present, `colbert_linear` / `sparse_linear` (`.pt` or `.safetensors`).
    pub fn load(be: &B, dir: &Path, dtype: DType) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!("{}: model directory not found", dir.display());
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        tokenizer.check_vocab(config.vocab_size, &dir.join("config.json"))?;
        let weights = weights_file(dir)?;
        let mut file = TensorFile::open(&weights)?;
        let mut encoder = EncoderWeights::load(be, &mut file, &config, dtype)?;
        encoder.pack_for_inference(be)?;
        let h = config.hidden_size;
        let mut colbert_head = load_head(be, dir, "colbert_linear", None, h, dtype)?;
        if let Some(head) = &mut colbert_head {
            be.pack_weight(&mut head.wt)?;
        }
        let sparse_head = load_head(be, dir, "sparse_linear", Some(1), h, dtype)?;
        Ok(Embedder {
            config,
            tokenizer,
            encoder,
            colbert_head,
            sparse_head,
            dir: dir.to_path_buf(),
        })
    }

    /// The model directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory has a sparse head.
    pub fn has_sparse(&self) -> bool {
        self.sparse_head.is_some()
    }

    /// Whether the directory has a colbert head.
    pub fn has_colbert(&self) -> bool {
        self.colbert_head.is_some()
    }

    /// Width of the colbert vectors (the colbert head's outputs), if there is a head.
    pub fn colbert_dim(&self) -> Option<usize> {
        self.colbert_head.as_ref().map(|h| h.wt.shape()[1])
    }

    /// The longest sequence the model takes, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.config.max_tokens()
    }

    /// Tokenizes one text as `encode` would (max length capped by the position table).
    pub fn tokenize(&self, text: &str, opts: &EncodeOptions) -> anyhow::Result<Encoded> {
        self.tokenizer
            .encode(text, opts.max_length.min(self.max_tokens()), opts.mcls)
    }

    /// Last hidden states `[tokens, hidden]` of a packed batch.
    pub fn forward(
        &self,
        be: &B,
        batch: &crate::batch::PackedBatch,
    ) -> anyhow::Result<crate::Tensor<B>> {
        Ok(encoder::forward(be, &self.encoder, &self.config, batch)?)
    }

    /// Encodes `texts`; `progress` is told how many texts each finished batch held.
    pub fn encode(
        &self,
        be: &B,
        texts: &[&str],
        opts: &EncodeOptions,
        progress: &mut dyn FnMut(usize),
    ) -> anyhow::Result<EncodeResult> {
        self.check_heads(opts)?;
        let encoded: Vec<Encoded> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                self.tokenize(t, opts)
                    .with_context(|| format!("text {}", i + 1))
            })
            .collect::<anyhow::Result<_>>()?;
        self.encode_tokenized(be, &encoded, opts, progress)
    }

    /// Refuses outputs whose head the directory lacks, naming the file.
    pub fn check_heads(&self, opts: &EncodeOptions) -> anyhow::Result<()> {
        if opts.sparse && self.sparse_head.is_none() {
            bail!(
                "sparse output needs sparse_linear.pt (or .safetensors) in {}, which has none",
                self.dir.display()
            );
        }
        if opts.colbert && self.colbert_head.is_none() {
            bail!(
                "colbert output needs colbert_linear.pt (or .safetensors) in {}, which has none",
                self.dir.display()
            );
        }
        Ok(())
    }

    /// Encodes texts already tokenized by [`Embedder::tokenize`] (a server tokenizes beside
    /// the model and packs many requests' texts into one call).
    pub fn encode_tokenized(
        &self,
        be: &B,
        encoded: &[Encoded],
        opts: &EncodeOptions,
        progress: &mut dyn FnMut(usize),
    ) -> anyhow::Result<EncodeResult> {
        self.check_heads(opts)?;
        let truncated = encoded.iter().filter(|e| e.truncated).count();
        let mut out = vec![Embedding::default(); encoded.len()];
        let unused = self.tokenizer.specials;
        let unused = unused.unused();
        for batch in pack(
            encoded,
            opts.batch_tokens.max(1),
            self.config.position_offset(),
        ) {
            let hidden = self.forward(be, &batch)?;
            let cls: Vec<Vec<usize>> = batch
                .origin
                .iter()
                .map(|&i| encoded[i].cls_positions.clone())
                .collect();
            if opts.dense {
                for (i, v) in heads::dense(be, &hidden, &batch, &cls, opts.pooling)?
                    .into_iter()
                    .enumerate()
                {
                    out[batch.origin[i]].dense = Some(v);
                }
            }
            if let (true, Some(head)) = (opts.sparse, &self.sparse_head) {
                for (i, v) in heads::lexical(be, &hidden, &batch, head, &unused)?
                    .into_iter()
                    .enumerate()
                {
                    out[batch.origin[i]].lexical = Some(v);
                }
            }
            if let (true, Some(head)) = (opts.colbert, &self.colbert_head) {
                for (i, v) in heads::colbert(be, &hidden, &batch, &cls, head)?
                    .into_iter()
                    .enumerate()
                {
                    out[batch.origin[i]].colbert = Some(v);
                }
            }
            progress(batch.len());
        }
        Ok(EncodeResult {
            embeddings: out,
            truncated,
        })
    }
}
