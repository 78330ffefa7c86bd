//! `m3 search index | query`: embed a corpus once (dense matrix, inverted lexical index,
//! colbert rows), then retrieve candidates by dense and by lexical top-k, take their union
//! and re-rank by the weighted hybrid including colbert (SPEC §4 "Hybrid retrieval"); the
//! index itself is [`m3::index`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use m3::atomic::ensure_replaceable;
use m3::backend::Backend;
use m3::index::{self, Index, IndexWriter, ModelFingerprint};
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::score::Weights;
use m3::DType;
use serde::Serialize;
use serde_json::Value;

use super::clobber::{files_in, named, refuse_dir_holding_input, refuse_same_file};
use super::device::{on_device, Job};
use super::encode::{check_max_length, progress, warn_truncated, ModelArgs};
use super::jsonl::{read_chunk, text_record, Lines, Sink};
use super::score::parse_weights;

const CHUNK: usize = 1024;

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

impl IndexArgs {
    /// Refuses an index directory that holds an input or files other than an index's.
    fn check_paths(&self) -> anyhow::Result<()> {
        let mut inputs = files_in("--model", &self.model.model);
        inputs.push(named("--model", &self.model.model));
        inputs.push(named("--corpus", &self.corpus));
        refuse_dir_holding_input(&named("--index", &self.index), &inputs)?;
        ensure_replaceable(&self.index, &index::FILES, "an m3 index")
    }
}

impl Job for IndexArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        self.check_paths()?;
        let model = Embedder::load(be, &self.model.model, dtype)?;
        let opts = EncodeOptions::all_outputs(self.max_length, self.model.batch_tokens);
        let mut lines = Lines::open(&self.corpus)?;
        let pb = progress("passages");
        let mut writer = IndexWriter::new(ModelFingerprint::of_model(&model)?);
        let mut truncated = 0;
        loop {
            let (records, err) = read_chunk(&mut lines, CHUNK, &text_record);
            if let Some(e) = err {
                // An index with holes is worse than none: stop before writing anything.
                return Err(e.context("the index was not written"));
            }
            let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
            let out = model.encode(be, &texts, &opts, &mut |n| pb.inc(n as u64))?;
            truncated += out.truncated;
            for (r, e) in records.iter().zip(&out.embeddings) {
                let id = r.id.clone().unwrap_or_else(|| Value::from(writer.len()));
                let what = format!("{}: passage {}", lines.name(), writer.len() + 1);
                writer
                    .add(id, e, &what)
                    .context("the index was not written")?;
            }
            if records.len() < CHUNK {
                break;
            }
        }
        pb.finish_and_clear();
        if writer.is_empty() {
            bail!("{}: the corpus has no passages", self.corpus.display());
        }
        let count = writer.len();
        writer.write(&self.index)?;
        warn_truncated(
            truncated,
            &format!("{} tokens", self.max_length.min(model.max_tokens())),
            "",
        );
        eprintln!("indexed {count} passages into {}", self.index.display());
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(Serialize)]
struct HitLine<'a> {
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
    results: Vec<HitLine<'a>>,
}

impl Job for QueryArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        let mut inputs = files_in("--model", &self.model.model);
        inputs.extend(files_in("--index", &self.index));
        inputs.push(named("--input", &self.input));
        refuse_same_file(&[named("--output", &self.output)], &inputs)?;
        let index = Index::load(&self.index)?;
        let model = Embedder::load(be, &self.model.model, dtype)?;
        index.check_model(&self.model.model, &ModelFingerprint::of_model(&model)?)?;
        let opts = EncodeOptions::all_outputs(self.max_length, self.model.batch_tokens);
        let mut lines = Lines::open(&self.input)?;
        let mut sink = Sink::create(&self.output)?;
        let result = loop {
            let (records, err) = read_chunk(&mut lines, CHUNK, &text_record);
            let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
            let out = model.encode(be, &texts, &opts, &mut |_| {})?;
            for (r, e) in records.iter().zip(&out.embeddings) {
                let results = index
                    .search(e, self.top_k, self.weights)?
                    .into_iter()
                    .map(|h| HitLine {
                        id: index.id(h.passage),
                        score: h.scores.all,
                        dense: h.scores.dense,
                        sparse: h.scores.sparse,
                        colbert: h.scores.colbert,
                    })
                    .collect();
                sink.write(&QueryLine {
                    id: r.id.as_ref(),
                    results,
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
        SearchCommand::Index(a) => {
            check_max_length("--max-length", a.max_length)?;
            on_device(a.model.device, a)
        }
        SearchCommand::Query(a) => {
            check_max_length("--max-length", a.max_length)?;
            on_device(a.model.device, a)
        }
    }
}
