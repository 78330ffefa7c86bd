//! `m3 search index | query`: embed a corpus once (dense matrix, inverted lexical index,
//! colbert rows), then retrieve candidates by dense and by lexical top-k, take their union
//! and re-rank by the weighted hybrid including colbert (SPEC §4 "Hybrid retrieval"). The
//! index is held by Qdrant's in-process engine ([`m3::retrieval::qdrant`], the default) or
//! by m3's own files ([`m3::index`]); queries go through [`m3::retrieval`] either way.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use m3::atomic::ensure_replaceable;
use m3::backend::Backend;
use m3::index::{self, IndexWriter, ModelFingerprint};
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::score::Weights;
use m3::DType;
use serde::Serialize;
use serde_json::{Map, Value};

use super::clobber::{files_in, named, refuse_dir_holding_input, refuse_same_file};
use super::device::{on_device, Job};
use super::encode::{check_max_length, progress, warn_truncated, ModelArgs};
use super::jsonl::{read_chunk, text_record, Lines, Sink, TextRecord};
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

/// Which engine holds a new index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// Qdrant's in-process engine: streamed, resumable, kept fields.
    Qdrant,
    /// m3's own files, written whole at the end (dense.safetensors, colbert.safetensors,
    /// lexical.json, meta.json).
    M3,
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
    /// Index directory. With the qdrant engine, an existing index of the same model is
    /// resumed: passages it holds already are skipped.
    #[arg(long)]
    index: PathBuf,
    /// Engine holding the index.
    #[arg(long, value_enum, default_value_t = default_engine())]
    engine: Engine,
    /// Corpus fields to keep with each passage (qdrant engine), returned with the results:
    /// comma-separated names.
    #[arg(long, value_delimiter = ',')]
    keep: Vec<String>,
    /// Maximum tokens per passage.
    #[arg(long, default_value_t = 8192)]
    max_length: usize,
}

fn default_engine() -> Engine {
    if cfg!(feature = "qdrant") {
        Engine::Qdrant
    } else {
        Engine::M3
    }
}

/// `m3 search query` flags.
#[derive(Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Index directory made by `m3 search index` (either engine).
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
        match self.engine {
            Engine::M3 => {
                if !self.keep.is_empty() {
                    bail!("--keep needs --engine qdrant (m3's own index keeps ids only)");
                }
                ensure_replaceable(&self.index, &index::FILES, "an m3 index")
            }
            // The engine checks the directory itself: empty, or an index to resume.
            Engine::Qdrant => Ok(()),
        }
    }

    /// Reads a corpus line: the text record and the fields to keep.
    fn record(
        &self,
        src: &str,
        line: usize,
        v: Value,
    ) -> anyhow::Result<(TextRecord, Map<String, Value>)> {
        let mut fields = Map::new();
        if let Value::Object(o) = &v {
            for k in &self.keep {
                if let Some(x) = o.get(k) {
                    fields.insert(k.clone(), x.clone());
                }
            }
        }
        Ok((text_record(src, line, v)?, fields))
    }
}

impl Job for IndexArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        self.check_paths()?;
        let model = Embedder::load(be, &self.model.model, dtype)?;
        match self.engine {
            Engine::M3 => self.own_index(be, &model),
            Engine::Qdrant => self.qdrant_index(be, &model),
        }
    }
}

impl IndexArgs {
    /// m3's own index: every passage encoded, then the files written whole.
    fn own_index<B: Backend>(&self, be: &B, model: &Embedder<B>) -> anyhow::Result<ExitCode> {
        let opts = EncodeOptions::all_outputs(self.max_length, self.model.batch_tokens);
        let mut lines = Lines::open(&self.corpus)?;
        let pb = progress("passages");
        let mut writer = IndexWriter::new(ModelFingerprint::of_model(model)?);
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
        self.warn_truncated(truncated, model);
        eprintln!("indexed {count} passages into {}", self.index.display());
        Ok(ExitCode::SUCCESS)
    }

    fn warn_truncated<B: Backend>(&self, n: usize, model: &Embedder<B>) {
        let limit = format!("{} tokens", self.max_length.min(model.max_tokens()));
        warn_truncated(n, &limit, "");
    }

    /// Qdrant: chunks encoded and upserted as they come, each chunk's upsert running while
    /// the next one is encoded; passages the index holds already are skipped, so a run cut
    /// short (crash, bad line) goes on where it stopped when run again.
    #[cfg(feature = "qdrant")]
    fn qdrant_index<B: Backend>(&self, be: &B, model: &Embedder<B>) -> anyhow::Result<ExitCode> {
        use m3::retrieval::qdrant::{Passage, QdrantIndex};
        let fp = ModelFingerprint::of_model(model)?;
        let index = QdrantIndex::create_or_resume(&self.index, &fp, &self.keep)?;
        let opts = EncodeOptions::all_outputs(self.max_length, self.model.batch_tokens);
        let mut lines = Lines::open(&self.corpus)?;
        let pb = progress("passages");
        let (mut seen, mut added, mut truncated) = (0u64, 0usize, 0usize);
        let (mut encode_s, mut upsert_s) = (Duration::ZERO, Duration::ZERO);
        let kept = |e: anyhow::Error, added: usize| {
            e.context(format!(
                "{} passages were indexed before this and are kept; run again to go on",
                added
            ))
        };
        let result = std::thread::scope(|s| -> anyhow::Result<()> {
            let mut pending: Option<std::thread::ScopedJoinHandle<'_, anyhow::Result<Duration>>> =
                None;
            let wait = |pending: &mut Option<std::thread::ScopedJoinHandle<'_, _>>| match pending
                .take()
                .map(|h| h.join())
            {
                None => Ok(Duration::ZERO),
                Some(Ok(r)) => r,
                Some(Err(_)) => bail!("the upsert thread panicked"),
            };
            loop {
                let (records, err) =
                    read_chunk(&mut lines, CHUNK, &|src, line, v| self.record(src, line, v));
                let ids: Vec<Value> = records
                    .iter()
                    .enumerate()
                    .map(|(i, (r, _))| r.id.clone().unwrap_or_else(|| Value::from(seen + i as u64)))
                    .collect();
                let held = index.holds(&ids)?;
                let todo: Vec<usize> = (0..records.len()).filter(|&i| !held[i]).collect();
                let texts: Vec<&str> = todo.iter().map(|&i| records[i].0.text.as_str()).collect();
                let t = Instant::now();
                let out = model.encode(be, &texts, &opts, &mut |n| pb.inc(n as u64))?;
                encode_s += t.elapsed();
                pb.inc((records.len() - todo.len()) as u64);
                truncated += out.truncated;
                let passages: Vec<Passage> = todo
                    .iter()
                    .zip(out.embeddings)
                    .map(|(&i, embedding)| Passage {
                        id: ids[i].clone(),
                        pos: seen + i as u64,
                        embedding,
                        fields: records[i].1.clone(),
                    })
                    .collect();
                upsert_s += wait(&mut pending).map_err(|e| kept(e, added))?;
                added += passages.len();
                let index = &index;
                pending = Some(s.spawn(move || {
                    let t = Instant::now();
                    index.upsert(passages)?;
                    Ok(t.elapsed())
                }));
                seen += records.len() as u64;
                if let Some(e) = err {
                    let done = wait(&mut pending);
                    index.flush();
                    done.map_err(|e| kept(e, added))?;
                    return Err(kept(e, added));
                }
                if records.len() < CHUNK {
                    upsert_s += wait(&mut pending)?;
                    return Ok(());
                }
            }
        });
        index.flush();
        pb.finish_and_clear();
        result?;
        if seen == 0 {
            bail!("{}: the corpus has no passages", self.corpus.display());
        }
        self.warn_truncated(truncated, model);
        eprintln!(
            "indexed {added} new passages ({} held in all) into {} (qdrant; encode {:.1} s, \
             upsert {:.1} s)",
            index.count()?,
            self.index.display(),
            encode_s.as_secs_f64(),
            upsert_s.as_secs_f64()
        );
        Ok(ExitCode::SUCCESS)
    }

    #[cfg(not(feature = "qdrant"))]
    fn qdrant_index<B: Backend>(&self, _: &B, _: &Embedder<B>) -> anyhow::Result<ExitCode> {
        bail!("--engine qdrant: this m3 was built without the qdrant feature; use --engine m3")
    }
}

#[derive(Serialize)]
struct QueryLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    results: Vec<m3::retrieval::Found>,
}

impl Job for QueryArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        let mut inputs = files_in("--model", &self.model.model);
        inputs.extend(files_in("--index", &self.index));
        inputs.push(named("--input", &self.input));
        refuse_same_file(&[named("--output", &self.output)], &inputs)?;
        let index = m3::retrieval::open(&self.index)?;
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
                sink.write(&QueryLine {
                    id: r.id.as_ref(),
                    results: index.search(e, self.top_k, self.weights)?,
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
