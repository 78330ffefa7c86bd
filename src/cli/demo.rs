//! `m3 demo`: train a tiny M3 from random weights on the synthetic multilingual retrieval
//! set in `fixtures/demo` (CPU, about a minute) and show recall of every retrieval mode
//! before and after.

use super::out::outln;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use m3::backend::cpu::Cpu;
use m3::model::config::Config;
use m3::model::embedder::{Embedder, Embedding, EncodeOptions};
use m3::model::random::write_random_model;
use m3::score::{colbert_matrix, dense_matrix, lexical_matrix, top_k, InvertedIndex, Weights};
use m3::train::model::SIDE_FILES;
use m3::train::options::TrainOptions;
use m3::train::trainer::run_training;
use m3::DType;
use serde::Deserialize;

/// `m3 demo` flags.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The demo set: config.json, tokenizer, train.jsonl, corpus.jsonl, queries.jsonl.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo"))]
    dir: PathBuf,
    /// Working directory for the random and the trained model (default: a temporary one,
    /// removed afterwards).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimiser steps (1000: about 35 s of training on two cores).
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Queries per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Passages per query.
    #[arg(long, default_value_t = 4)]
    group: usize,
    /// Peak learning rate (a random tiny model wants a large one).
    #[arg(long, default_value_t = 3e-3)]
    learning_rate: f32,
    /// Temperature.
    #[arg(long, default_value_t = 0.05)]
    temperature: f32,
    /// Seed of the random weights and of training.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Deserialize)]
struct Passage {
    id: String,
    text: String,
}

#[derive(Deserialize)]
struct Query {
    query: String,
    pos: Vec<String>,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Vec<T>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

/// Recall@1 and @10 per mode: dense, sparse, colbert, hybrid.
type Recalls = [(f64, f64); 4];

fn evaluate(dir: &Path, corpus: &[Passage], queries: &[Query]) -> anyhow::Result<Recalls> {
    let m = Embedder::load(&Cpu, dir, DType::F32)?;
    let opts = EncodeOptions {
        sparse: true,
        colbert: true,
        max_length: 64,
        ..EncodeOptions::default()
    };
    let encode = |texts: Vec<&str>| -> anyhow::Result<Vec<Embedding>> {
        Ok(m.encode(&Cpu, &texts, &opts, &mut |_| {})?.embeddings)
    };
    let p = encode(corpus.iter().map(|p| p.text.as_str()).collect())?;
    let q = encode(queries.iter().map(|q| q.query.as_str()).collect())?;
    let dense = |v: &[Embedding]| {
        v.iter()
            .map(|e| e.dense.clone().unwrap())
            .collect::<Vec<_>>()
    };
    let lex = |v: &[Embedding]| {
        v.iter()
            .map(|e| e.lexical.clone().unwrap())
            .collect::<Vec<_>>()
    };
    let col = |v: &[Embedding]| {
        v.iter()
            .map(|e| e.colbert.clone().unwrap())
            .collect::<Vec<_>>()
    };
    let d = dense_matrix(&dense(&q), &dense(&p));
    let s = lexical_matrix(&lex(&q), &InvertedIndex::build(&lex(&p)));
    let c = colbert_matrix(&col(&q), &col(&p));
    let w = Weights::default();
    let h: Vec<Vec<f32>> = (0..queries.len())
        .map(|i| {
            (0..corpus.len())
                .map(|j| {
                    (w.dense * d[i][j] + w.sparse * s[i][j] + w.colbert * c[i][j])
                        / (w.dense + w.sparse + w.colbert)
                })
                .collect()
        })
        .collect();
    let index: std::collections::HashMap<&str, usize> = corpus
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id.as_str(), i))
        .collect();
    let recall = |scores: &[Vec<f32>]| -> (f64, f64) {
        let (mut r1, mut r10) = (0.0, 0.0);
        for (qi, q) in queries.iter().enumerate() {
            let want: Vec<usize> = q
                .pos
                .iter()
                .filter_map(|id| index.get(id.as_str()).copied())
                .collect();
            let top = top_k(&scores[qi], 10);
            r1 += top.first().is_some_and(|t| want.contains(t)) as u32 as f64;
            r10 += top.iter().any(|t| want.contains(t)) as u32 as f64;
        }
        let n = queries.len().max(1) as f64;
        (r1 / n, r10 / n)
    };
    Ok([recall(&d), recall(&s), recall(&c), recall(&h)])
}

/// Runs `m3 demo`; a temporary working directory is removed whether it succeeds or not.
pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let temp = a.out.is_none();
    let work = a
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("m3-demo-{}", std::process::id())));
    let result = demo(&a, &work);
    if temp {
        let _ = std::fs::remove_dir_all(&work);
    } else if result.is_ok() {
        outln!(
            "\nmodels: {} (random), {} (trained)",
            work.join("random").display(),
            work.join("trained").display()
        )?;
    }
    result
}

fn demo(a: &DemoArgs, work: &Path) -> anyhow::Result<ExitCode> {
    let init = work.join("random");
    std::fs::create_dir_all(&init).with_context(|| format!("{}: cannot create", init.display()))?;
    for f in SIDE_FILES {
        let src = a.dir.join(f);
        if src.exists() {
            std::fs::copy(&src, init.join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    let config = Config::from_file(&init.join("config.json"))?;
    write_random_model(&init, &config, a.seed)?;
    let corpus: Vec<Passage> = read_jsonl(&a.dir.join("corpus.jsonl"))?;
    let queries: Vec<Query> = read_jsonl(&a.dir.join("queries.jsonl"))?;
    eprintln!(
        "demo: a random {}-layer, hidden-{} M3 ({} passages, {} held-out queries); evaluating…",
        config.num_hidden_layers,
        config.hidden_size,
        corpus.len(),
        queries.len()
    );
    let t0 = std::time::Instant::now();
    let before = evaluate(&init, &corpus, &queries)?;
    let trained = work.join("trained");
    let mut opts = TrainOptions::new(
        init.clone(),
        vec![a.dir.join("train.jsonl")],
        trained.clone(),
    );
    opts.batch_size = a.batch_size;
    opts.group = a.group;
    opts.query_max_len = 32;
    opts.passage_max_len = 64;
    opts.temperature = a.temperature;
    opts.adamw.lr = a.learning_rate;
    opts.max_steps = Some(a.steps);
    opts.seed = a.seed;
    // A random tiny model's CLS vectors barely depend on the text at first; 10% dropout
    // noise swamps that signal and dense retrieval does not learn within the demo's
    // budget (measured: dense CE stays at ln(B·G) for 300 steps with it, falls without).
    opts.dropout = Some(0.0);
    let t_train = std::time::Instant::now();
    run_training(
        &Cpu,
        opts,
        DType::F32,
        false,
        None,
        &mut super::train::Bar::new(),
        &m3::collective::Solo,
    )?;
    let train_s = t_train.elapsed().as_secs_f64();
    let after = evaluate(&trained, &corpus, &queries)?;
    outln!(
        "trained {} steps in {train_s:.0} s ({:.0} s in all)\n",
        a.steps,
        t0.elapsed().as_secs_f64()
    )?;
    outln!("mode      recall@1 before → after   recall@10 before → after")?;
    for (name, (b, f)) in ["dense", "sparse", "colbert", "hybrid"]
        .iter()
        .zip(before.iter().zip(&after))
    {
        outln!(
            "{name:<8}  {:>6.3} → {:<6.3}             {:>6.3} → {:<6.3}",
            b.0,
            f.0,
            b.1,
            f.1
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
