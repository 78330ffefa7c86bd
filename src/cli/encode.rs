//! `m3 encode`: JSONL texts in, one JSON object of embeddings per line out, same order.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use m3::backend::Backend;
use m3::model::embedder::{Embedder, Embedding, EncodeOptions};
use m3::model::heads::Pooling;
use m3::DType;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::clobber::{files_in, named, refuse_dir_holding_input, refuse_same_file};
use super::device::{on_device, Job};
use super::jsonl::{read_chunk, text_record, Lines, Sink, TextRecord};
use super::npy::{NpySink, NPY_FILES};
use super::DeviceArg;

/// Texts read, encoded and written per round: bounds memory on large inputs.
const CHUNK: usize = 1024;

/// Dense pooling.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum PoolingArg {
    /// The CLS token (BGE-M3).
    Cls,
    /// The mean over all tokens (sentence-transformers models).
    Mean,
}

/// Flags shared by commands that encode texts.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory in BAAI's bge-m3 layout (config.json, tokenizer.json,
    /// model.safetensors or pytorch_model.bin, colbert_linear.pt, sparse_linear.pt).
    #[arg(long)]
    pub model: PathBuf,
    /// Token budget of one packed batch (no padding: batches fill up to this many tokens).
    #[arg(long, default_value_t = 16384)]
    pub batch_tokens: usize,
    /// Where to run: CUDA when built with it and a GPU is present, else CPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

/// `m3 encode` flags.
#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL input: each line a JSON string or an object with "text" and optional "id"
    /// ("-" = stdin).
    #[arg(long, default_value = "-")]
    input: PathBuf,
    /// JSONL output, one object per input line in input order ("-" = stdout).
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Write NumPy arrays to this directory instead of JSONL: dense.npy `[N, D]`,
    /// colbert.npy `[T, D]` with colbert_offsets.npy `[N+1]`, lexical_ids.npy and
    /// lexical_weights.npy with lexical_offsets.npy, ids.jsonl. For colbert at GPU speed:
    /// JSON text is far slower to write than a GPU encodes, at 11 bytes per float.
    #[arg(long, conflicts_with = "output")]
    npy_dir: Option<PathBuf>,
    /// Comma-separated outputs: dense, sparse, colbert.
    #[arg(long, default_value = "dense,sparse", value_delimiter = ',')]
    outputs: Vec<OutputKind>,
    /// Maximum tokens per text, special tokens included (capped by the model's positions).
    #[arg(long, default_value_t = 8192)]
    max_length: usize,
    /// Dense pooling.
    #[arg(long, value_enum, default_value_t = PoolingArg::Cls)]
    pooling: PoolingArg,
    /// Multi-CLS: a CLS before every 256 tokens; dense = mean of the CLS states.
    #[arg(long)]
    mcls: bool,
}

/// One of the three outputs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// Dense vector ("dense_vecs").
    Dense,
    /// Lexical weights ("lexical_weights").
    Sparse,
    /// Colbert vectors ("colbert_vecs").
    Colbert,
}

/// Lexical weights as a JSON object `{"<token id>": weight}`, ordered by id.
struct LexMap<'a>(&'a [(u32, f32)]);

impl Serialize for LexMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (id, w) in self.0 {
            m.serialize_entry(&id.to_string(), w)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct Line<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dense_vecs: Option<&'a [f32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lexical_weights: Option<LexMap<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    colbert_vecs: Option<&'a [Vec<f32>]>,
}

/// A spinner with a count and rate on stderr (hidden when stderr is not a terminal).
pub fn progress(what: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {{pos}} {what} [{{elapsed}}, {{per_sec}}]"
        ))
        .expect("valid template"),
    );
    pb
}

/// Prints the one summary warning about truncated texts; `limit` says which limit.
pub fn warn_truncated(n: usize, limit: &str, hint: &str) {
    if n > 0 {
        eprintln!("warning: {n} text(s) were longer than {limit} and were truncated{hint}");
    }
}

/// Refuses a `--max-length` with no room for a content token, naming the flag.
pub fn check_max_length(flag: &str, n: usize) -> anyhow::Result<()> {
    if n < 3 {
        anyhow::bail!(
            "{flag} {n} leaves no room for text: it counts CLS and EOS, so it must be at least 3"
        );
    }
    Ok(())
}

/// Encode options from the flags.
fn options(a: &EncodeArgs) -> EncodeOptions {
    EncodeOptions {
        max_length: a.max_length,
        pooling: match a.pooling {
            PoolingArg::Cls => Pooling::Cls,
            PoolingArg::Mean => Pooling::Mean,
        },
        batch_tokens: a.model.batch_tokens,
        mcls: a.mcls,
        dense: a.outputs.contains(&OutputKind::Dense),
        sparse: a.outputs.contains(&OutputKind::Sparse),
        colbert: a.outputs.contains(&OutputKind::Colbert),
    }
}

/// Where `m3 encode` writes.
enum Out {
    Jsonl(Sink),
    Npy(Box<NpySink>),
}

impl Out {
    fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Out::Jsonl(s) => s.flush(),
            Out::Npy(s) => s.flush(),
        }
    }
}

fn write_line(sink: &mut Sink, r: &TextRecord, e: &Embedding) -> anyhow::Result<()> {
    sink.write(&Line {
        id: r.id.as_ref(),
        dense_vecs: e.dense.as_deref(),
        lexical_weights: e.lexical.as_deref().map(LexMap),
        colbert_vecs: e.colbert.as_deref(),
    })
}

impl Job for EncodeArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        let opts = options(&self);
        let mut inputs = files_in("--model", &self.model.model);
        inputs.push(named("--input", &self.input));
        match &self.npy_dir {
            Some(dir) => {
                inputs.push(named("--model", &self.model.model));
                refuse_dir_holding_input(&named("--npy-dir", dir), &inputs)?;
                m3::atomic::ensure_replaceable(dir, &NPY_FILES, "m3's npy output")?;
            }
            None => refuse_same_file(&[named("--output", &self.output)], &inputs)?,
        }
        let model = Embedder::load(be, &self.model.model, dtype)?;
        let mut lines = Lines::open(&self.input)?;
        // The npy directory is built beside the old one and swapped in when the run ends
        // (also at a malformed line, after the lines before it): the old output stays whole
        // until then, and a crash leaves it untouched.
        let mut staged = None;
        let mut sink = match &self.npy_dir {
            Some(dir) => {
                let stage = m3::atomic::StagedDir::new(dir)?;
                let colbert_dim = opts.colbert.then(|| model.colbert_dim()).flatten();
                let dense_dim = opts.dense.then_some(model.config.hidden_size);
                let s = NpySink::create(stage.path(), dense_dim, opts.sparse, colbert_dim)?;
                staged = Some(stage);
                Out::Npy(Box::new(s))
            }
            None => Out::Jsonl(Sink::create(&self.output)?),
        };
        let pb = progress("texts");
        let mut truncated = 0;
        let limit = format!("{} tokens", opts.max_length.min(model.max_tokens()));
        let hint = if opts.mcls {
            ""
        } else {
            " (--mcls keeps a CLS summary of every 256 tokens)"
        };
        loop {
            let (records, err) = read_chunk(&mut lines, CHUNK, &text_record);
            if !records.is_empty() {
                let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
                let out = model.encode(be, &texts, &opts, &mut |n| pb.inc(n as u64))?;
                truncated += out.truncated;
                for (r, e) in records.iter().zip(&out.embeddings) {
                    match &mut sink {
                        Out::Jsonl(s) => write_line(s, r, e)?,
                        Out::Npy(s) => s.write(r.id.as_ref(), e)?,
                    }
                }
                if let Out::Npy(s) = &mut sink {
                    // Headers follow each chunk, so the arrays always match the rows written.
                    s.flush()?;
                }
            }
            if let Some(e) = err {
                sink.flush()?;
                drop(sink);
                if let Some(s) = staged {
                    s.commit()?;
                }
                pb.finish_and_clear();
                warn_truncated(truncated, &limit, hint);
                return Err(e);
            }
            if records.len() < CHUNK {
                break;
            }
        }
        sink.flush()?;
        drop(sink);
        if let Some(s) = staged {
            s.commit()?;
        }
        pb.finish_and_clear();
        warn_truncated(truncated, &limit, hint);
        Ok(ExitCode::SUCCESS)
    }
}

/// Runs `m3 encode`.
pub fn run(args: EncodeArgs) -> anyhow::Result<ExitCode> {
    if args.outputs.is_empty() {
        anyhow::bail!("--outputs is empty: name at least one of dense, sparse, colbert");
    }
    check_max_length("--max-length", args.max_length)?;
    on_device(args.model.device, args)
}
