//! `m3 search index | query`: embed a corpus once (dense matrix, inverted lexical index,
//! colbert rows), then retrieve candidates by dense and by lexical top-k, take their union
//! and re-rank by the weighted hybrid including colbert (SPEC §4 "Hybrid retrieval").

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use m3::backend::Backend;
use m3::model::checkpoint::read_checkpoint;
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::score::{self, InvertedIndex, Weights};
use m3::DType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::device::{on_device, Job};
use super::encode::{progress, warn_truncated, ModelArgs};
use super::jsonl::{read_chunk, text_record, Lines, Sink};
use super::score::parse_weights;

const CHUNK: usize = 1024;
const FORMAT: &str = "m3-index/1";

/// `m3 search` subcommands.
#[derive(Subcommand, Debug)]
pub enum SearchCommand {
    /// Embed a corpus once into an index directory.
    Index(IndexArgs),
    /// Retrieve and re-rank passages for queries.
    Query(QueryArgs),
}

/// `m3 search index` flags.
#[derive(Args, Debug)]
pub struct IndexArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Corpus JSONL: each line a JSON string or {"text": ..., "id"?: ...}; without an id a
    /// passage is known by its 0-based position.
    #[arg(long)]
    corpus: PathBuf,
    /// Index directory to create (dense.safetensors, colbert.safetensors, lexical.json,
    /// meta.json).
    #[arg(long)]
    index: PathBuf,
    /// Maximum tokens per passage.
    #[arg(long, default_value_t = 8192)]
    max_length: usize,
}

/// `m3 search query` flags.
#[derive(Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Index directory made by `m3 search index`.
    #[arg(long)]
    index: PathBuf,
    /// Query JSONL: each line a JSON string or {"text": ..., "id"?: ...} ("-" = stdin).
    #[arg(long, default_value = "-")]
    input: PathBuf,
    /// JSONL output: per query, the ranked passages with their scores ("-" = stdout).
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Passages returned per query; also the candidate count taken from each of dense and
    /// lexical retrieval.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Hybrid weights for dense, sparse and colbert.
    #[arg(long, default_value = "0.4,0.2,0.4", value_parser = parse_weights)]
    weights: Weights,
    /// Maximum tokens per query.
    #[arg(long, default_value_t = 512)]
    max_length: usize,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: String,
    count: usize,
    ids: Vec<Value>,
    dense_dim: usize,
    colbert_dim: usize,
    colbert_offsets: Vec<usize>,
}

fn write_f32(path: &Path, name: &str, data: &[f32], shape: [usize; 2]) -> anyhow::Result<()> {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), bytes)?;
    safetensors::tensor::serialize_to_file([(name, view)], None, path)
        .with_context(|| format!("{}: cannot write", path.display()))
}

fn read_f32(path: &Path, name: &str) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
    let mut t = read_checkpoint(path)?;
    let t = t
        .remove(name)
        .with_context(|| format!("{}: tensor {name} is missing", path.display()))?;
    Ok((t.data, t.shape))
}

impl Job for IndexArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        let model = Embedder::load(be, &self.model.model, dtype)?;
        let opts = EncodeOptions::all_outputs(self.max_length, self.model.batch_tokens);
        let mut lines = Lines::open(&self.corpus)?;
        let pb = progress("passages");
        let (mut ids, mut dense, mut colbert, mut offsets, mut lexical) =
            (Vec::new(), Vec::new(), Vec::new(), vec![0usize], Vec::new());
        let (mut dense_dim, mut colbert_dim, mut truncated) = (0, 0, 0);
        loop {
            let (records, err) = read_chunk(&mut lines, CHUNK, &text_record);
            if let Some(e) = err {
                // An index with holes is worse than none: stop before writing anything.
                return Err(e.context("the index was not written"));
            }
            let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
            let out = model.encode(be, &texts, &opts, &mut |n| pb.inc(n as u64))?;
            truncated += out.truncated;
            for (r, e) in records.iter().zip(out.embeddings) {
                ids.push(r.id.clone().unwrap_or_else(|| Value::from(ids.len())));
                let d = e.dense.expect("dense requested");
                dense_dim = d.len();
                dense.extend(d);
                for row in e.colbert.expect("colbert requested") {
                    colbert_dim = row.len();
                    colbert.extend(row);
                }
                offsets.push(colbert.len() / colbert_dim.max(1));
                lexical.push(e.lexical.expect("sparse requested"));
            }
            if records.len() < CHUNK {
                break;
            }
        }
        pb.finish_and_clear();
        if ids.is_empty() {
            bail!("{}: the corpus has no passages", self.corpus.display());
        }
        std::fs::create_dir_all(&self.index)
            .with_context(|| format!("{}: cannot create", self.index.display()))?;
        write_f32(
            &self.index.join("dense.safetensors"),
            "dense",
            &dense,
            [ids.len(), dense_dim],
        )?;
        write_f32(
            &self.index.join("colbert.safetensors"),
            "colbert",
            &colbert,
            [*offsets.last().unwrap(), colbert_dim],
        )?;
        let inv = InvertedIndex::build(&lexical);
        let postings: HashMap<String, &Vec<(u32, f32)>> = inv
            .postings()
            .iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        std::fs::write(
            self.index.join("lexical.json"),
            serde_json::to_vec(&postings)?,
        )?;
        let meta = Meta {
            format: FORMAT.into(),
            count: ids.len(),
            ids,
            dense_dim,
            colbert_dim,
            colbert_offsets: offsets,
        };
        // meta.json last: its presence marks a complete index.
        std::fs::write(self.index.join("meta.json"), serde_json::to_vec(&meta)?)?;
        warn_truncated(
            truncated,
            &format!("{} tokens", self.max_length.min(model.max_tokens())),
            "",
        );
        eprintln!(
            "indexed {} passages into {}",
            meta.count,
            self.index.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// A loaded index.
struct Index {
    meta: Meta,
    dense: Vec<f32>,
    colbert: Vec<f32>,
    lexical: InvertedIndex,
}

impl Index {
    fn load(dir: &Path) -> anyhow::Result<Self> {
        let meta_path = dir.join("meta.json");
        let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).with_context(|| {
            format!(
                "{}: not an index (run m3 search index)",
                meta_path.display()
            )
        })?)
        .with_context(|| format!("{}: malformed", meta_path.display()))?;
        if meta.format != FORMAT {
            bail!(
                "{}: index format {:?}, expected {FORMAT:?}",
                meta_path.display(),
                meta.format
            );
        }
        let (dense, dshape) = read_f32(&dir.join("dense.safetensors"), "dense")?;
        let (colbert, cshape) = read_f32(&dir.join("colbert.safetensors"), "colbert")?;
        let rows = *meta.colbert_offsets.last().unwrap_or(&0);
        if dshape != [meta.count, meta.dense_dim]
            || cshape != [rows, meta.colbert_dim]
            || meta.colbert_offsets.len() != meta.count + 1
        {
            bail!(
                "{}: files disagree with meta.json (dense {dshape:?}, colbert {cshape:?})",
                dir.display()
            );
        }
        let lex_path = dir.join("lexical.json");
        let postings: HashMap<String, Vec<(u32, f32)>> =
            serde_json::from_slice(&std::fs::read(&lex_path)?)
                .with_context(|| format!("{}: malformed", lex_path.display()))?;
        let postings = postings
            .into_iter()
            .map(|(k, v)| Ok((k.parse::<u32>()?, v)))
            .collect::<anyhow::Result<HashMap<_, _>>>()
            .with_context(|| format!("{}: bad token id", lex_path.display()))?;
        if postings
            .values()
            .flatten()
            .any(|&(p, _)| p as usize >= meta.count)
        {
            bail!(
                "{}: a posting names a passage beyond {}",
                lex_path.display(),
                meta.count
            );
        }
        Ok(Index {
            lexical: InvertedIndex::from_postings(postings, meta.count),
            meta,
            dense,
            colbert,
        })
    }

    fn colbert_rows(&self, p: usize) -> Vec<Vec<f32>> {
        let d = self.meta.colbert_dim;
        (self.meta.colbert_offsets[p]..self.meta.colbert_offsets[p + 1])
            .map(|r| self.colbert[r * d..(r + 1) * d].to_vec())
            .collect()
    }
}

#[derive(Serialize)]
struct Hit<'a> {
    id: &'a Value,
    score: f32,
    dense: f32,
    sparse: f32,
    colbert: f32,
}

#[derive(Serialize)]
struct QueryLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    results: Vec<Hit<'a>>,
}

impl Job for QueryArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        let index = Index::load(&self.index)?;
        let model = Embedder::load(be, &self.model.model, dtype)?;
        let opts = EncodeOptions::all_outputs(self.max_length, self.model.batch_tokens);
        let mut lines = Lines::open(&self.input)?;
        let mut sink = Sink::create(&self.output)?;
        let d = index.meta.dense_dim;
        let result = loop {
            let (records, err) = read_chunk(&mut lines, CHUNK, &text_record);
            let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
            let out = model.encode(be, &texts, &opts, &mut |_| {})?;
            for (r, e) in records.iter().zip(&out.embeddings) {
                let (Some(qd), Some(ql), Some(qc)) = (&e.dense, &e.lexical, &e.colbert) else {
                    unreachable!("all outputs requested")
                };
                if qd.len() != d {
                    bail!("the model's dense size {} differs from the index's {d}: was it built with another model?", qd.len());
                }
                let dense: Vec<f32> = index.dense.chunks(d).map(|p| score::dense(qd, p)).collect();
                let lexical = index.lexical.scores(ql);
                let candidates: BTreeSet<usize> = score::top_k(&dense, self.top_k)
                    .into_iter()
                    .chain(score::top_k(&lexical, self.top_k))
                    .collect();
                let mut hits: Vec<Hit> = candidates
                    .into_iter()
                    .map(|p| {
                        let s = score::combine(
                            dense[p],
                            lexical[p],
                            score::colbert(qc, &index.colbert_rows(p)),
                            self.weights,
                        );
                        Hit {
                            id: &index.meta.ids[p],
                            score: s.all,
                            dense: s.dense,
                            sparse: s.sparse,
                            colbert: s.colbert,
                        }
                    })
                    .collect();
                hits.sort_by(|a, b| b.score.total_cmp(&a.score));
                hits.truncate(self.top_k);
                sink.write(&QueryLine {
                    id: r.id.as_ref(),
                    results: hits,
                })?;
            }
            if let Some(e) = err {
                break Err(e);
            }
            if records.len() < CHUNK {
                break Ok(ExitCode::SUCCESS);
            }
        };
        sink.flush()?;
        result
    }
}

/// Runs `m3 search index | query`.
pub fn run(c: SearchCommand) -> anyhow::Result<ExitCode> {
    match c {
        SearchCommand::Index(a) => on_device(a.model.device, a),
        SearchCommand::Query(a) => on_device(a.model.device, a),
    }
}
