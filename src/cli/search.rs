//! `m3 search index | query`: embed a corpus once (dense matrix, inverted lexical index,
//! colbert rows), then retrieve candidates by dense and by lexical top-k, take their union
//! and re-rank by the weighted hybrid including colbert (SPEC §4 "Hybrid retrieval"). The
//! index is held by Qdrant's in-process engine ([`m3::retrieval::qdrant`], the default),
//! by m3's own files ([`m3::index`]), or by a Qdrant server or cluster
//! (`--qdrant-url --collection`, [`m3::retrieval`]'s `qdrant_server`); queries go through
//! [`m3::retrieval`] whichever it is.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use m3::atomic::ensure_replaceable;
use m3::backend::Backend;
use m3::index::{self, IndexWriter, ModelFingerprint};
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::retrieval::{Collection, Retriever};
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

/// Flags naming a Qdrant server or cluster that holds the index instead of a directory.
#[derive(Args, Debug, Clone)]
pub struct QdrantServerArgs {
    /// A Qdrant server or cluster holding the index instead of a directory: its gRPC URL,
    /// e.g. http://localhost:6334 (needs --collection).
    #[arg(long, requires = "collection", conflicts_with = "index")]
    pub qdrant_url: Option<String>,
    /// The collection on --qdrant-url.
    #[arg(long, requires = "qdrant_url")]
    pub collection: Option<String>,
    /// Qdrant API key, if the server asks for one (default: $QDRANT_API_KEY).
    #[arg(long, requires = "qdrant_url")]
    pub qdrant_api_key: Option<String>,
    /// Seconds each request to the Qdrant server may take.
    #[arg(long, default_value_t = 60, requires = "qdrant_url")]
    pub qdrant_timeout: u64,
    /// Queries: dense candidates by exact search instead of the server's HNSW graph
    /// (slower at scale; the in-process engine's candidates exactly).
    #[arg(long, requires = "qdrant_url")]
    pub exact: bool,
}

impl QdrantServerArgs {
    /// The server and collection, if `--qdrant-url` was given.
    #[cfg(feature = "qdrant-server")]
    pub fn server(&self) -> Option<m3::retrieval::qdrant_server::Server> {
        let url = self.qdrant_url.clone()?;
        Some(m3::retrieval::qdrant_server::Server {
            url,
            collection: self.collection.clone().unwrap_or_default(),
            api_key: self.qdrant_api_key.clone().or_else(|| {
                std::env::var("QDRANT_API_KEY")
                    .ok()
                    .filter(|k| !k.is_empty())
            }),
            timeout: Duration::from_secs(self.qdrant_timeout.max(1)),
            exact: self.exact,
        })
    }

    /// Opens the index for queries: the collection if `--qdrant-url` was given, else the
    /// directory `index` (`flag` names it in messages).
    pub fn open(&self, index: Option<&Path>, flag: &str) -> anyhow::Result<Box<dyn Retriever>> {
        if self.qdrant_url.is_some() {
            #[cfg(feature = "qdrant-server")]
            {
                let server = self.server().expect("--qdrant-url was given");
                return Ok(Box::new(m3::retrieval::qdrant_server::QdrantServer::open(
                    &server,
                )?));
            }
            #[cfg(not(feature = "qdrant-server"))]
            bail!("--qdrant-url: this m3 was built without the qdrant-server feature");
        }
        match index {
            Some(dir) => m3::retrieval::open(dir),
            None => bail!("{flag} DIR or --qdrant-url URL --collection NAME is needed"),
        }
    }
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
    #[arg(long, required_unless_present = "qdrant_url")]
    index: Option<PathBuf>,
    #[command(flatten)]
    server: QdrantServerArgs,
    /// Shards of a new collection on --qdrant-url (default: the server's).
    #[arg(long, requires = "qdrant_url")]
    shards: Option<u32>,
    /// Copies of each shard of a new collection on --qdrant-url (default: the server's).
    #[arg(long, requires = "qdrant_url")]
    replicas: Option<u32>,
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
    #[arg(long, required_unless_present = "qdrant_url")]
    index: Option<PathBuf>,
    #[command(flatten)]
    server: QdrantServerArgs,
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
        let Some(dir) = &self.index else {
            // A collection on a server: nothing local to clobber.
            return Ok(());
        };
        let mut inputs = files_in("--model", &self.model.model);
        inputs.push(named("--model", &self.model.model));
        inputs.push(named("--corpus", &self.corpus));
        refuse_dir_holding_input(&named("--index", dir), &inputs)?;
        match self.engine {
            Engine::M3 => {
                if !self.keep.is_empty() {
                    bail!("--keep needs --engine qdrant (m3's own index keeps ids only)");
                }
                ensure_replaceable(dir, &index::FILES, "an m3 index")
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
        if self.server.qdrant_url.is_some() {
            return self.server_index(be, &model);
        }
        let dir = self
            .index
            .clone()
            .expect("clap requires --index without --qdrant-url");
        match self.engine {
            Engine::M3 => self.own_index(be, &model, &dir),
            Engine::Qdrant => self.qdrant_index(be, &model, &dir),
        }
    }
}

impl IndexArgs {
    /// m3's own index: every passage encoded, then the files written whole.
    fn own_index<B: Backend>(
        &self,
        be: &B,
        model: &Embedder<B>,
        dir: &Path,
    ) -> anyhow::Result<ExitCode> {
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
        writer.write(dir)?;
        self.warn_truncated(truncated, model);
        eprintln!("indexed {count} passages into {}", dir.display());
        Ok(ExitCode::SUCCESS)
    }

    fn warn_truncated<B: Backend>(&self, n: usize, model: &Embedder<B>) {
        let limit = format!("{} tokens", self.max_length.min(model.max_tokens()));
        warn_truncated(n, &limit, "");
    }

    /// Qdrant in process, in `dir`.
    #[cfg(feature = "qdrant")]
    fn qdrant_index<B: Backend>(
        &self,
        be: &B,
        model: &Embedder<B>,
        dir: &Path,
    ) -> anyhow::Result<ExitCode> {
        let fp = ModelFingerprint::of_model(model)?;
        let index = m3::retrieval::qdrant::QdrantIndex::create_or_resume(dir, &fp, &self.keep)?;
        self.stream_into(be, model, &index, "qdrant")
    }

    #[cfg(not(feature = "qdrant"))]
    fn qdrant_index<B: Backend>(
        &self,
        _: &B,
        _: &Embedder<B>,
        _: &Path,
    ) -> anyhow::Result<ExitCode> {
        bail!("--engine qdrant: this m3 was built without the qdrant feature; use --engine m3")
    }

    /// A Qdrant server or cluster: the collection created (laid out by --shards and
    /// --replicas) or resumed.
    #[cfg(feature = "qdrant-server")]
    fn server_index<B: Backend>(&self, be: &B, model: &Embedder<B>) -> anyhow::Result<ExitCode> {
        use m3::retrieval::qdrant_server::{Layout, QdrantServer};
        let server = self.server.server().expect("--qdrant-url was given");
        let fp = ModelFingerprint::of_model(model)?;
        let layout = Layout {
            shards: self.shards,
            replicas: self.replicas,
        };
        let index = QdrantServer::create_or_resume(&server, &fp, &self.keep, layout)?;
        self.stream_into(be, model, &index, "qdrant server")
    }

    #[cfg(not(feature = "qdrant-server"))]
    fn server_index<B: Backend>(&self, _: &B, _: &Embedder<B>) -> anyhow::Result<ExitCode> {
        bail!("--qdrant-url: this m3 was built without the qdrant-server feature")
    }

    /// Chunks encoded and upserted as they come, each chunk's upsert running while the
    /// next one is encoded; passages the index holds already are skipped, so a run cut
    /// short (crash, bad line) goes on where it stopped when run again.
    #[cfg_attr(
        not(any(feature = "qdrant", feature = "qdrant-server")),
        allow(dead_code)
    )]
    fn stream_into<B: Backend>(
        &self,
        be: &B,
        model: &Embedder<B>,
        index: &dyn Collection,
        engine: &str,
    ) -> anyhow::Result<ExitCode> {
        use m3::retrieval::Passage;
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
                    let flushed = index.flush();
                    done.map_err(|e| kept(e, added))?;
                    flushed.map_err(|e| kept(e, added))?;
                    return Err(kept(e, added));
                }
                if records.len() < CHUNK {
                    upsert_s += wait(&mut pending)?;
                    return Ok(());
                }
            }
        });
        let flushed = index.flush();
        pb.finish_and_clear();
        result?;
        flushed?;
        if seen == 0 {
            bail!("{}: the corpus has no passages", self.corpus.display());
        }
        self.warn_truncated(truncated, model);
        eprintln!(
            "indexed {added} new passages ({} held in all) into {} ({engine}; encode {:.1} s, \
             upsert {:.1} s)",
            index.passages()?,
            index.place(),
            encode_s.as_secs_f64(),
            upsert_s.as_secs_f64()
        );
        Ok(ExitCode::SUCCESS)
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
        if let Some(dir) = &self.index {
            inputs.extend(files_in("--index", dir));
        }
        inputs.push(named("--input", &self.input));
        refuse_same_file(&[named("--output", &self.output)], &inputs)?;
        let index = self.server.open(self.index.as_deref(), "--index")?;
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
