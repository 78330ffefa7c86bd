//! `m3 bench`: end-to-end encoder throughput on a random model of BGE-M3's full shape,
//! for side-by-side runs with `scripts/bench_torch.py` (same weights, same token ids).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use m3::backend::Backend;
use m3::batch::pack;
use m3::gradcheck::Rng;
use m3::model::checkpoint::write_safetensors;
use m3::model::config::Config;
use m3::model::encoder;
use m3::model::weights::{EncoderWeights, TensorFile};
use m3::text::Encoded;
use m3::DType;
use serde_json::json;

use super::device::{on_device, Job};
use super::DeviceArg;

/// `m3 bench` subcommands.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Write a random model directory (config.json, model.safetensors, colbert_linear and
    /// sparse_linear heads), BGE-M3's shape by default: 24 layers, hidden 1024, 16 heads, FFN 4096, vocab 250002, 8194 positions.
    MakeModel(MakeModelArgs),
    /// Time the encoder's forward pass over packed batches of random token ids.
    Encode(EncodeBenchArgs),
}

/// `m3 bench make-model` flags.
#[derive(Args, Debug)]
pub struct MakeModelArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Transformer layers.
    #[arg(long, default_value_t = 24)]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// FFN inner size.
    #[arg(long, default_value_t = 4096)]
    intermediate: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 250_002)]
    vocab: usize,
    /// Position table rows.
    #[arg(long, default_value_t = 8194)]
    positions: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// `m3 bench encode` flags.
#[derive(Args, Debug)]
pub struct EncodeBenchArgs {
    /// Model directory (config.json + model.safetensors), e.g. from `m3 bench make-model`.
    #[arg(long)]
    model: PathBuf,
    /// Sequence lengths: `uniform:N` or `mixed:MIN-MAX` (uniformly drawn).
    #[arg(long, default_value = "uniform:512")]
    lengths: String,
    /// Total tokens to encode per run.
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Token budget of one packed batch.
    #[arg(long, default_value_t = 16384)]
    batch_tokens: usize,
    /// Timed runs (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Write the token ids used (JSON list of lists) for the PyTorch peer.
    #[arg(long)]
    save_inputs: Option<PathBuf>,
    /// Random seed of the inputs.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

fn make_model(a: &MakeModelArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let config = json!({
        "architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta",
        "vocab_size": a.vocab, "hidden_size": a.hidden, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "intermediate_size": a.intermediate,
        "max_position_embeddings": a.positions, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
        "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "position_embedding_type": "absolute", "initializer_range": 0.02,
    });
    std::fs::write(
        a.out.join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let (h, i) = (a.hidden, a.intermediate);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![a.vocab, h]),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![a.positions, h],
        ),
        ("embeddings.token_type_embeddings.weight".into(), vec![1, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..a.layers {
        let p = format!("encoder.layer.{l}");
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            shapes.push((format!("{p}.{name}.weight"), vec![out, inp]));
            shapes.push((format!("{p}.{name}.bias"), vec![out]));
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}.{n}.weight"), vec![h]));
            shapes.push((format!("{p}.{n}.bias"), vec![h]));
        }
    }
    let mut rng = Rng::new(a.seed);
    // BERT-style initialisation: weights ~ U(-0.035, 0.035) (std 0.02), LayerNorm gains 1.
    let data: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            if name.ends_with("LayerNorm.weight") {
                vec![1.0; n]
            } else {
                rng.vec(n, -0.035, 0.035)
            }
        })
        .collect();
    let tensors: Vec<(String, Vec<usize>, &[f32])> = shapes
        .iter()
        .zip(&data)
        .map(|((name, shape), v)| (name.clone(), shape.clone(), v.as_slice()))
        .collect();
    write_safetensors(&a.out.join("model.safetensors"), &tensors)?;
    // Heads as `torch.nn.Linear` initialises them (U(±1/√hidden)), so training runs too.
    let bound = 1.0 / (h as f32).sqrt();
    for (stem, out) in [("colbert_linear", h), ("sparse_linear", 1)] {
        let w = rng.vec(out * h, -bound, bound);
        let b = rng.vec(out, -bound, bound);
        write_safetensors(
            &a.out.join(format!("{stem}.safetensors")),
            &[
                ("weight".into(), vec![out, h], &w),
                ("bias".into(), vec![out], &b),
            ],
        )?;
    }
    eprintln!(
        "wrote a random {}-layer model to {}",
        a.layers,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Random sequences (CLS + ids + EOS) totalling at least `tokens`.
fn inputs(
    spec: &str,
    tokens: usize,
    vocab: usize,
    max_tokens: usize,
    seed: u64,
) -> anyhow::Result<Vec<Encoded>> {
    let mut rng = Rng::new(seed);
    let (lo, hi) = match spec.split_once(':') {
        Some(("uniform", n)) => {
            let n: usize = n.parse()?;
            (n, n)
        }
        Some(("mixed", r)) => {
            let (a, b) = r.split_once('-').context("mixed:MIN-MAX")?;
            (a.parse()?, b.parse()?)
        }
        _ => anyhow::bail!("--lengths must be uniform:N or mixed:MIN-MAX, got {spec:?}"),
    };
    if lo < 2 || hi < lo || hi > max_tokens {
        anyhow::bail!("lengths {lo}..{hi} must lie within 2..{max_tokens}");
    }
    let mut out = Vec::new();
    let mut total = 0;
    while total < tokens {
        let len = lo + rng.below((hi - lo + 1) as u32) as usize;
        let mut ids = vec![0u32];
        ids.extend((0..len - 2).map(|_| 3 + rng.below(vocab as u32 - 4)));
        ids.push(2);
        total += len;
        out.push(Encoded {
            ids,
            cls_positions: vec![0],
            truncated: false,
        });
    }
    Ok(out)
}

impl Job for EncodeBenchArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        let config = Config::from_file(&self.model.join("config.json"))?;
        let mut file = TensorFile::open(&self.model.join("model.safetensors"))?;
        let weights = EncoderWeights::load(be, &mut file, &config, dtype)?;
        drop(file);
        let seqs = inputs(
            &self.lengths,
            self.tokens,
            config.vocab_size,
            config.max_tokens(),
            self.seed,
        )?;
        if let Some(path) = &self.save_inputs {
            let ids: Vec<&Vec<u32>> = seqs.iter().map(|s| &s.ids).collect();
            std::fs::write(path, serde_json::to_vec(&ids)?)?;
        }
        let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
        let batches = pack(&seqs, self.batch_tokens, config.position_offset());
        let run = || -> anyhow::Result<f64> {
            let t0 = Instant::now();
            for b in &batches {
                let h = encoder::forward(be, &weights, &config, b)?;
                // Reading one value back waits for all queued device work.
                be.to_vec_f32(&h)?;
            }
            Ok(t0.elapsed().as_secs_f64())
        };
        run()?;
        let mut times = (0..self.repeat.max(1))
            .map(|_| run())
            .collect::<anyhow::Result<Vec<_>>>()?;
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{}",
            json!({
                "impl": "m3", "device": be.name(), "lengths": self.lengths, "sequences": seqs.len(),
                "tokens": total, "batches": batches.len(), "median_s": median,
                "tokens_per_s": total as f64 / median, "runs_s": times,
            })
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// Runs `m3 bench ...`.
pub fn run(c: BenchCommand) -> anyhow::Result<ExitCode> {
    match c {
        BenchCommand::MakeModel(a) => make_model(&a),
        BenchCommand::Encode(a) => on_device(a.device, a),
    }
}
