//! `m3 bench search`: indexing throughput and query latency of the two search engines
//! (Qdrant's in-process engine and m3's own index) on random embeddings of a chosen size,
//! no model needed, so corpora of 10⁵–10⁶ passages can be timed without encoding them.

use super::out::outln;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{ensure, Context};
use clap::Args;
use m3::index::{Index, IndexWriter, ModelFingerprint};
use m3::model::embedder::Embedding;
use m3::retrieval::{Found, Retriever};
use m3::rng::Rng;
use m3::score::Weights;
use serde_json::{json, Value};

/// `m3 bench search` flags.
#[derive(Args, Debug)]
pub struct SearchBenchArgs {
    /// Directory for the indexes (`qdrant/` and `m3/` are created in it; it must not hold
    /// either yet).
    #[arg(long)]
    dir: PathBuf,
    /// Passages to index.
    #[arg(long, default_value_t = 100_000)]
    passages: usize,
    /// Dense vector size (BGE-M3: 1024).
    #[arg(long, default_value_t = 1024)]
    dense_dim: usize,
    /// Colbert vector size (BGE-M3: 1024).
    #[arg(long, default_value_t = 1024)]
    colbert_dim: usize,
    /// Colbert vectors per passage (a passage's tokens less CLS).
    #[arg(long, default_value_t = 8)]
    colbert_tokens: usize,
    /// Lexical terms per passage.
    #[arg(long, default_value_t = 32)]
    terms: usize,
    /// Vocabulary the terms are drawn from, log-uniformly (low ids common, as in text).
    #[arg(long, default_value_t = 250_002)]
    vocab: u32,
    /// Queries timed (the first 5 are also run once before, as a warm-up).
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Lexical terms and colbert vectors per query.
    #[arg(long, default_value_t = 8)]
    query_tokens: usize,
    /// Results per query.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Passages per upsert (qdrant engine).
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Which engines to time: `qdrant`, `m3` or `both` (results compared).
    #[arg(long, default_value = "both")]
    engine: String,
    /// Seed of the random embeddings.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Random unit-norm rows of `dim` values.
fn unit(rng: &mut Rng, dim: usize) -> Vec<f32> {
    let mut v = rng.vec(dim, -1.0, 1.0);
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// A random embedding: unit dense and colbert rows, `terms` distinct log-uniform token ids
/// with weights in [0, 0.3), sorted by id as the model's output is.
fn random_embedding(rng: &mut Rng, a: &SearchBenchArgs, terms: usize, tokens: usize) -> Embedding {
    let mut lexical = BTreeMap::new();
    let ln_vocab = (a.vocab.max(2) as f32).ln();
    while lexical.len() < terms.min(a.vocab as usize) {
        let id = ((rng.uniform(0.0, ln_vocab)).exp() as u32 - 1).min(a.vocab - 1);
        lexical.insert(id, rng.uniform(0.0, 0.3));
    }
    Embedding {
        dense: Some(unit(rng, a.dense_dim)),
        lexical: Some(lexical.into_iter().collect()),
        colbert: Some((0..tokens).map(|_| unit(rng, a.colbert_dim)).collect()),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Times `queries` through `r`: one JSON line of latency percentiles; returns the results.
fn time_queries(
    engine: &str,
    r: &dyn Retriever,
    queries: &[Embedding],
    top_k: usize,
) -> anyhow::Result<Vec<Vec<Found>>> {
    let w = Weights::default();
    for q in queries.iter().take(5) {
        r.search(q, top_k, w)?;
    }
    let mut ms = Vec::with_capacity(queries.len());
    let mut out = Vec::with_capacity(queries.len());
    let t = Instant::now();
    for q in queries {
        let s = Instant::now();
        out.push(r.search(q, top_k, w)?);
        ms.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let wall = t.elapsed().as_secs_f64();
    ms.sort_by(f64::total_cmp);
    outln!(
        "{}",
        json!({"engine": engine, "what": "query", "queries": queries.len(), "top_k": top_k,
               "p50_ms": percentile(&ms, 0.5), "p99_ms": percentile(&ms, 0.99),
               "max_ms": ms[ms.len() - 1], "queries_per_s": queries.len() as f64 / wall})
    )?;
    Ok(out)
}

fn fingerprint(a: &SearchBenchArgs) -> ModelFingerprint {
    ModelFingerprint {
        dense_dim: a.dense_dim,
        colbert_dim: a.colbert_dim,
        vocab_size: a.vocab as usize,
        files: BTreeMap::from([("random".to_string(), format!("seed {}", a.seed))]),
    }
}

/// The corpus, regenerated identically for each engine (it is never held whole).
fn corpus(a: &SearchBenchArgs) -> impl Iterator<Item = Embedding> + '_ {
    let mut rng = Rng::new(a.seed);
    (0..a.passages).map(move |_| random_embedding(&mut rng, a, a.terms, a.colbert_tokens))
}

fn index_m3(a: &SearchBenchArgs, dir: &Path) -> anyhow::Result<Index> {
    let t = Instant::now();
    let mut w = IndexWriter::new(fingerprint(a));
    for (i, e) in corpus(a).enumerate() {
        w.add(Value::from(i), &e, "random passage")?;
    }
    let added = t.elapsed().as_secs_f64();
    w.write(dir)?;
    let wall = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let index = Index::load(dir)?;
    outln!(
        "{}",
        json!({"engine": "m3", "what": "index", "passages": a.passages,
               "generate_and_add_s": added, "write_s": wall - added, "wall_s": wall,
               "passages_per_s": a.passages as f64 / wall,
               "load_s": t.elapsed().as_secs_f64()})
    )?;
    Ok(index)
}

#[cfg(feature = "qdrant")]
fn index_qdrant(a: &SearchBenchArgs, dir: &Path) -> anyhow::Result<Box<dyn Retriever>> {
    use m3::retrieval::qdrant::QdrantIndex;
    use m3::retrieval::{Collection, Passage};
    let t = Instant::now();
    let index = QdrantIndex::create_or_resume(dir, &fingerprint(a), &[])?;
    let mut upsert = 0f64;
    let mut corpus = corpus(a).enumerate().peekable();
    while corpus.peek().is_some() {
        let batch = corpus.by_ref().take(a.batch).map(|(i, e)| Passage {
            id: Value::from(i),
            pos: i as u64,
            embedding: e,
            fields: Default::default(),
        });
        let batch: Vec<Passage> = batch.collect();
        let s = Instant::now();
        index.upsert(batch)?;
        upsert += s.elapsed().as_secs_f64();
    }
    let s = Instant::now();
    index.flush()?;
    upsert += s.elapsed().as_secs_f64();
    let wall = t.elapsed().as_secs_f64();
    let held = index.count()?;
    ensure!(
        held == a.passages,
        "qdrant holds {held} points, {} upserted",
        a.passages
    );
    drop(index);
    let t = Instant::now();
    let index = QdrantIndex::open(dir)?;
    outln!(
        "{}",
        json!({"engine": "qdrant", "what": "index", "passages": a.passages,
               "upsert_s": upsert, "generate_s": wall - upsert, "wall_s": wall,
               "passages_per_s": a.passages as f64 / upsert,
               "load_s": t.elapsed().as_secs_f64()})
    )?;
    Ok(Box::new(index))
}

#[cfg(not(feature = "qdrant"))]
fn index_qdrant(_: &SearchBenchArgs, _: &Path) -> anyhow::Result<Box<dyn Retriever>> {
    anyhow::bail!("--engine qdrant: this m3 was built without the qdrant feature")
}

/// Runs the benchmark, one JSON line per measurement on stdout.
pub fn run(a: SearchBenchArgs) -> anyhow::Result<ExitCode> {
    ensure!(a.passages > 0, "--passages must be at least 1");
    ensure!(a.queries > 0, "--queries must be at least 1");
    ensure!(a.batch > 0, "--batch must be at least 1");
    ensure!(a.vocab >= 2, "--vocab must be at least 2");
    let (m3, qdrant) = match a.engine.as_str() {
        "both" => (true, true),
        "m3" => (true, false),
        "qdrant" => (false, true),
        e => anyhow::bail!("--engine {e:?}: one of qdrant, m3, both"),
    };
    for (on, sub) in [(m3, "m3"), (qdrant, "qdrant")] {
        let d = a.dir.join(sub);
        ensure!(
            !on || !d.exists(),
            "{}: exists; give an empty --dir (the benchmark does not reuse indexes)",
            d.display()
        );
    }
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("{}: cannot create", a.dir.display()))?;
    let mut rng = Rng::new(a.seed ^ 0x5155_4552_5921);
    let queries: Vec<Embedding> = (0..a.queries)
        .map(|_| random_embedding(&mut rng, &a, a.query_tokens, a.query_tokens))
        .collect();
    let mut results = Vec::new();
    if m3 {
        let index = index_m3(&a, &a.dir.join("m3"))?;
        results.push(time_queries("m3", &index, &queries, a.top_k)?);
    }
    if qdrant {
        let index = index_qdrant(&a, &a.dir.join("qdrant"))?;
        results.push(time_queries("qdrant", index.as_ref(), &queries, a.top_k)?);
    }
    if let [x, y] = &results[..] {
        let same = x.iter().zip(y).filter(|(p, q)| ids(p) == ids(q)).count();
        let scores_equal = x
            .iter()
            .zip(y)
            .filter(|(p, q)| top_scores(p) == top_scores(q))
            .count();
        outln!(
            "{}",
            json!({"what": "agreement", "queries": x.len(), "same_ids": same,
                   "same_scores": scores_equal})
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn ids(found: &[Found]) -> Vec<&Value> {
    found.iter().map(|f| &f.id).collect()
}

fn top_scores(found: &[Found]) -> Vec<u32> {
    found.iter().map(|f| f.scores.all.to_bits()).collect()
}
