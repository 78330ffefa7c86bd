//! `m3 score`: query/passage pairs in, the five scores of SPEC §4 per pair out. Each pair is
//! scored on its own (no B×B matrix).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use m3::backend::Backend;
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::score::{self, Weights};
use m3::DType;
use serde::Serialize;
use serde_json::Value;

use super::clobber::{files_in, named, refuse_same_file};
use super::device::{on_device, Job};
use super::encode::{check_max_length, progress, warn_truncated, ModelArgs};
use super::jsonl::{read_chunk, Lines, Sink};

const CHUNK: usize = 512;

/// `m3 score` flags.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL pairs: {"query": ..., "passage": ..., "id"?: ...} ("-" = stdin).
    #[arg(long)]
    input: PathBuf,
    /// JSONL output, one object per pair ("-" = stdout).
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Hybrid weights for dense, sparse and colbert.
    #[arg(long, default_value = "0.4,0.2,0.4", value_parser = parse_weights)]
    weights: Weights,
    /// Maximum tokens per query.
    #[arg(long, default_value_t = 512)]
    query_max_length: usize,
    /// Maximum tokens per passage.
    #[arg(long, default_value_t = 8192)]
    passage_max_length: usize,
}

/// Parses `W1,W2,W3` (dense, sparse, colbert).
pub fn parse_weights(s: &str) -> Result<Weights, String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>().map_err(|e| format!("{x:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match v.as_slice() {
        [d, sp, c] if v.iter().all(|w| w.is_finite() && *w >= 0.0) && d + sp + c > 0.0 => {
            Ok(Weights {
                dense: *d,
                sparse: *sp,
                colbert: *c,
            })
        }
        _ => Err(format!(
            "expected three non-negative weights W1,W2,W3 with a positive sum, got {s:?}"
        )),
    }
}

struct Pair {
    id: Option<Value>,
    query: String,
    passage: String,
}

fn pair(src: &str, line: usize, v: Value) -> anyhow::Result<Pair> {
    let Value::Object(mut o) = v else {
        bail!("{src}:{line}: expected an object with \"query\" and \"passage\"");
    };
    let mut field = |k: &str| match o.remove(k) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("{src}:{line}: \"{k}\" must be a string, got {other}"),
        None => bail!("{src}:{line}: missing \"{k}\""),
    };
    let query = field("query")?;
    let passage = field("passage")?;
    Ok(Pair {
        id: o.remove("id"),
        query,
        passage,
    })
}

#[derive(Serialize)]
struct Line<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    dense: f32,
    sparse: f32,
    colbert: f32,
    #[serde(rename = "sparse+dense")]
    sparse_dense: f32,
    #[serde(rename = "colbert+sparse+dense")]
    all: f32,
}

impl Job for ScoreArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        let mut inputs = files_in("--model", &self.model.model);
        inputs.push(named("--input", &self.input));
        refuse_same_file(&[named("--output", &self.output)], &inputs)?;
        let model = Embedder::load(be, &self.model.model, dtype)?;
        let batch_tokens = self.model.batch_tokens;
        let qo = EncodeOptions::all_outputs(self.query_max_length, batch_tokens);
        let po = EncodeOptions::all_outputs(self.passage_max_length, batch_tokens);
        let mut lines = Lines::open(&self.input)?;
        let mut sink = Sink::create(&self.output)?;
        let pb = progress("pairs");
        let mut truncated = 0;
        let result = loop {
            let (pairs, err) = read_chunk(&mut lines, CHUNK, &pair);
            if !pairs.is_empty() {
                let qs: Vec<&str> = pairs.iter().map(|p| p.query.as_str()).collect();
                let ps: Vec<&str> = pairs.iter().map(|p| p.passage.as_str()).collect();
                let q = model.encode(be, &qs, &qo, &mut |_| {})?;
                let p = model.encode(be, &ps, &po, &mut |_| {})?;
                truncated += q.truncated + p.truncated;
                for ((pr, q), p) in pairs.iter().zip(&q.embeddings).zip(&p.embeddings) {
                    let (Some(qd), Some(pd), Some(ql), Some(pl), Some(qc), Some(pc)) = (
                        &q.dense, &p.dense, &q.lexical, &p.lexical, &q.colbert, &p.colbert,
                    ) else {
                        unreachable!("all three outputs were requested");
                    };
                    let s = score::combine(
                        score::dense(qd, pd),
                        score::lexical(ql, pl),
                        score::colbert(qc, pc),
                        self.weights,
                    );
                    sink.write(&Line {
                        id: pr.id.as_ref(),
                        dense: s.dense,
                        sparse: s.sparse,
                        colbert: s.colbert,
                        sparse_dense: s.sparse_dense,
                        all: s.all,
                    })?;
                }
                pb.inc(pairs.len() as u64);
            }
            if let Some(e) = err {
                break Err(e);
            }
            if pairs.len() < CHUNK {
                break Ok(ExitCode::SUCCESS);
            }
        };
        sink.flush()?;
        pb.finish_and_clear();
        let limit = format!(
            "their limit ({} tokens for queries, {} for passages)",
            self.query_max_length.min(model.max_tokens()),
            self.passage_max_length.min(model.max_tokens())
        );
        warn_truncated(truncated, &limit, "");
        result
    }
}

/// Runs `m3 score`.
pub fn run(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    check_max_length("--query-max-length", args.query_max_length)?;
    check_max_length("--passage-max-length", args.passage_max_length)?;
    on_device(args.model.device, args)
}
