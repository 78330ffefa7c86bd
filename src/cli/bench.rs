//! `m3 bench`: end-to-end encoder throughput on a random model of BGE-M3's full shape,
//! for side-by-side runs with `scripts/bench_torch.py` (same weights, same token ids).

use super::out::outln;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use m3::backend::Backend;
use m3::batch::pack;
use m3::model::config::Config;
use m3::model::encoder;
use m3::model::random::write_random_model;
use m3::model::weights::{EncoderWeights, TensorFile};
use m3::text::Encoded;
use m3::DType;
use serde_json::json;

use super::bench_inputs::{inputs, train_inputs};
use super::device::{on_device, Job};
use super::{ComputeArg, DeviceArg};

/// `m3 bench` subcommands.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Write a random model directory (config.json, model.safetensors, colbert_linear and
    /// sparse_linear heads), BGE-M3's shape by default: 24 layers, hidden 1024, 16 heads, FFN 4096, vocab 250002, 8194 positions.
    MakeModel(MakeModelArgs),
    /// Time the encoder's forward pass over packed batches of random token ids.
    Encode(EncodeBenchArgs),
    /// Time full training steps (forward, backward, clipping, AdamW, weight refresh) on one
    /// batch of random token ids; `scripts/bench_torch_train.py` is the PyTorch peer.
    Train(TrainBenchArgs),
    /// The largest training batch that fits the GPU per passage length, from the peak
    /// device memory of steps at batch 1 and 2 (the question of the paper's Table 10).
    Memory(super::bench_memory::MemoryBenchArgs),
    /// The CPU's f32 FMA peak and each matrix-product implementation's GFLOP/s on the
    /// encoder's shapes (m3's AVX-512 / AVX2 kernels, also with the right operand packed
    /// beforehand, and the `gemm` crate).
    Gemm(super::bench_gemm::GemmBenchArgs),
    /// Indexing throughput and query latency of the search engines (Qdrant's in-process
    /// engine, m3's own index) on random embeddings of BGE-M3's sizes.
    Search(super::bench_search::SearchBenchArgs),
}

/// `m3 bench train` flags.
#[derive(Args, Debug)]
pub struct TrainBenchArgs {
    /// Model directory with heads, e.g. from `m3 bench make-model`.
    #[arg(long)]
    model: PathBuf,
    /// Queries per batch B.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Passages per query G.
    #[arg(long, default_value_t = 4)]
    group: usize,
    /// Query length in tokens (CLS and EOS included).
    #[arg(long, default_value_t = 32)]
    query_len: usize,
    /// Passage length in tokens.
    #[arg(long, default_value_t = 128)]
    passage_len: usize,
    /// Temperature τ.
    #[arg(long, default_value_t = 0.02)]
    temperature: f32,
    /// Timed steps after one warm-up step; the median is reported.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Encode at most N sequences at a time.
    #[arg(long)]
    sub_batch_size: Option<usize>,
    /// Write the batch (`{"queries", "passages", "group", "temperature", "excluded"}`)
    /// for the PyTorch peer.
    #[arg(long)]
    save_inputs: Option<PathBuf>,
    /// Random seed of the token ids.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Compute precision (bf16 keeps f32 master weights and an f32 loss).
    #[arg(long, value_enum, default_value_t = ComputeArg::F32)]
    compute_dtype: ComputeArg,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// CPU matrix-product implementation (default: the kernel that runs a sample product
    /// fastest on this CPU, timed at start; `m3 bench gemm` lists them), for comparing
    /// them in one binary.
    #[arg(long)]
    cpu_gemm: Option<String>,
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
    /// CPU matrix-product implementation (default: the kernel that runs a sample product
    /// fastest on this CPU, timed at start; `m3 bench gemm` lists them), for comparing
    /// them in one binary.
    #[arg(long)]
    cpu_gemm: Option<String>,
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
    let c = Config::from_file(&a.out.join("config.json"))?;
    write_random_model(&a.out, &c, a.seed)?;
    eprintln!(
        "wrote a random {}-layer model to {}",
        a.layers,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

impl Job for EncodeBenchArgs {
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode> {
        let config = Config::from_file(&self.model.join("config.json"))?;
        let mut file = TensorFile::open(&self.model.join("model.safetensors"))?;
        let mut weights = EncoderWeights::load(be, &mut file, &config, dtype)?;
        weights.pack_for_inference(be)?;
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
            std::fs::write(path, serde_json::to_vec(&ids)?)
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
        let batches = pack(&seqs, self.batch_tokens, config.position_offset());
        // Per run: wall time, and the part spent queueing work (host side: launches, library
        // calls, any hidden synchronisation); on a GPU the rest is waiting for the device.
        let run = || -> anyhow::Result<(f64, f64)> {
            let t0 = Instant::now();
            let mut queued = 0f64;
            for b in &batches {
                let tq = Instant::now();
                let h = encoder::forward(be, &weights, &config, b)?;
                queued += tq.elapsed().as_secs_f64();
                be.synchronize()?;
                drop(h);
            }
            Ok((t0.elapsed().as_secs_f64(), queued))
        };
        run()?;
        let runs = (0..self.repeat.max(1))
            .map(|_| run())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut times: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let mut queued: Vec<f64> = runs.iter().map(|r| r.1).collect();
        times.sort_by(f64::total_cmp);
        queued.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let median_queued = queued[queued.len() / 2];
        outln!(
            "{}",
            json!({
                "impl": "m3", "device": be.name(), "lengths": self.lengths, "sequences": seqs.len(),
                "threads": rayon::current_num_threads(),
                "cpu_gemm": m3::backend::cpu::linalg::gemm_in_use(),
                "tokens": total, "batches": batches.len(), "median_s": median,
                "tokens_per_s": total as f64 / median, "runs_s": times,
                "queue_s_median": median_queued,
            })
        )?;
        Ok(ExitCode::SUCCESS)
    }
}

impl Job for TrainBenchArgs {
    fn run<B: Backend>(self, be: &B, device_dtype: DType) -> anyhow::Result<ExitCode> {
        use m3::batch::pack_in_order;
        use m3::train::forward::{RankLoss, StepBatch, StepDropout};
        use m3::train::loss::LossConfig;
        use m3::train::model::TrainModel;
        use m3::train::optim::AdamW;
        use m3::train::optimizer::Optimizer;
        use m3::train::step::{train_step, StepInput};

        let dtype = self.compute_dtype.dtype(device_dtype)?;
        let mut model = TrainModel::load(be, &self.model, DType::F32, self.seed)?;
        let adamw = AdamW::default();
        let mut opt = Optimizer::new(be, &mut model, dtype, adamw, 1.0, None)?;
        let c = model.config.clone();
        let (queries, passages) = train_inputs(
            &c,
            self.batch,
            self.group,
            self.query_len,
            self.passage_len,
            self.seed,
        )?;
        let excluded = vec![0, 1, 2, 3];
        if let Some(path) = &self.save_inputs {
            let ids = |v: &[Encoded]| v.iter().map(|e| e.ids.clone()).collect::<Vec<_>>();
            let batch = json!({
                "queries": ids(&queries), "passages": ids(&passages), "group": self.group,
                "temperature": self.temperature, "excluded": excluded,
            });
            std::fs::write(path, serde_json::to_vec(&batch)?)
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        let off = c.position_offset();
        let batch = StepBatch {
            q: pack_in_order(&queries, off),
            p: pack_in_order(&passages, off),
        };
        let tokens = batch.q.tokens() + batch.p.tokens();
        let mut cfg = LossConfig::new(self.group, excluded);
        cfg.temperature = self.temperature;
        let mut losses = Vec::new();
        let mut times = Vec::new();
        for k in 0..=self.steps {
            let t0 = Instant::now();
            let input = StepInput {
                batch: &batch,
                loss: &cfg,
                dropout: StepDropout { p: 0.0, seed: 0 },
                sub_batch: self.sub_batch_size,
                t: k as u64 + 1,
                lr: adamw.lr,
            };
            let loss = train_step(be, &mut model, &mut opt, &input, &RankLoss::solo())?.loss;
            if k > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
            losses.push(loss.loss);
            eprintln!(
                "step {k}: loss {} ({:.2} s)",
                loss.loss,
                t0.elapsed().as_secs_f64()
            );
        }
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        outln!(
            "{}",
            json!({
                "impl": "m3", "device": be.name(), "threads": rayon::current_num_threads(),
                "cpu_gemm": m3::backend::cpu::linalg::gemm_in_use(),
                "compute": dtype.to_string(), "batch": self.batch, "group": self.group, "tokens": tokens,
                "first_loss": losses[0], "losses": losses, "step_s_median": median,
                "step_s_all": times, "tokens_per_s": tokens as f64 / median,
            })
        )?;
        Ok(ExitCode::SUCCESS)
    }
}

/// Applies `--cpu-gemm`.
fn choose_cpu_gemm(name: &Option<String>) -> anyhow::Result<()> {
    match name {
        Some(n) => {
            m3::backend::cpu::linalg::choose_gemm(n).map_err(|e| anyhow::anyhow!("--cpu-gemm: {e}"))
        }
        None => Ok(()),
    }
}

/// Runs `m3 bench ...`.
pub fn run(c: BenchCommand) -> anyhow::Result<ExitCode> {
    match c {
        BenchCommand::MakeModel(a) => make_model(&a),
        BenchCommand::Encode(a) => {
            choose_cpu_gemm(&a.cpu_gemm)?;
            on_device(a.device, a)
        }
        BenchCommand::Train(a) => {
            choose_cpu_gemm(&a.cpu_gemm)?;
            on_device(a.device, a)
        }
        BenchCommand::Memory(a) => on_device(a.device, a),
        BenchCommand::Gemm(a) => super::bench_gemm::run(a),
        BenchCommand::Search(a) => super::bench_search::run(a),
    }
}
