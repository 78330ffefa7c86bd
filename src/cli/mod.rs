//! Command-line interface: argument parsing and dispatch to the subcommands.

mod bench;
mod bench_gemm;
mod bench_inputs;
mod bench_memory;
mod bench_search;
mod clobber;
mod demo;
mod device;
mod encode;
mod jsonl;
mod kernels;
mod npy;
mod out;
mod score;
mod search;
mod selfcheck;
mod serve;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// m3: M3-Embedding (BGE-M3) in Rust + CUDA: dense, sparse and colbert embeddings from one
/// forward pass, hybrid scoring and search, fine-tuning with self-knowledge distillation.
#[derive(Parser, Debug)]
#[command(name = "m3", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where ops run.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA when this binary has the `cuda` feature and a GPU is present, else CPU.
    Auto,
    /// The f32 CPU reference backend.
    Cpu,
    /// The CUDA backend (needs the `cuda` feature and an NVIDIA GPU).
    Cuda,
}

/// Precision of training compute (the optimiser's master weights are f32 either way).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeArg {
    /// f32 activations and weights (any device).
    F32,
    /// bf16 activations and weight copies with f32 accumulation and an f32 loss (CUDA only).
    Bf16,
}

impl ComputeArg {
    /// The compute dtype on a backend whose inference dtype is `device_dtype` (f32 on the
    /// CPU, bf16 on CUDA); bf16 on the CPU is an error naming the flag.
    pub fn dtype(self, device_dtype: m3::DType) -> anyhow::Result<m3::DType> {
        match self {
            ComputeArg::F32 => Ok(m3::DType::F32),
            ComputeArg::Bf16 if device_dtype == m3::DType::BF16 => Ok(m3::DType::BF16),
            ComputeArg::Bf16 => anyhow::bail!(
                "--compute-dtype bf16 needs the GPU (--device cuda); the CPU backend computes in f32"
            ),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a tiny M3 from random weights on a synthetic multilingual retrieval set (CPU,
    /// about a minute) and show recall of dense, sparse, colbert and hybrid retrieval before
    /// and after.
    Demo(demo::DemoArgs),
    /// Embed texts: dense vectors, lexical weights and/or colbert vectors, one JSON line per
    /// input line, in input order.
    Encode(encode::EncodeArgs),
    /// Score query/passage pairs: dense, sparse, colbert and the weighted hybrids.
    Score(score::ScoreArgs),
    /// Build a search index over a corpus, or query it with hybrid retrieval.
    #[command(subcommand)]
    Search(search::SearchCommand),
    /// Serve embeddings over HTTP: TEI's routes (/embed, /embed_sparse, /rerank,
    /// /tokenize, /info, /health, /metrics), OpenAI's /v1/embeddings, and m3's /encode,
    /// /score and /search, batching requests together.
    Serve(serve::ServeArgs),
    /// Fine-tune: unified dense + sparse + colbert loss with self-knowledge distillation,
    /// length-bucketed batches, optional sub-batching, checkpoints and resume.
    Train(train::TrainArgs),
    /// Benchmarks: random full-size models and encoder throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Model-free self-check: every op's gradient against finite differences on the CPU,
    /// and, with a GPU, every CUDA op (f32 and bf16) against the CPU reference.
    Selfcheck {
        /// Device to check besides the CPU reference.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Random seed for the inputs.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Print ptxas's per-kernel resource report (registers, shared memory, spills) for the
    /// kernels embedded in this binary.
    Kernels,
}

/// Parses arguments, runs the subcommand, maps errors to a message and exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Encode(a) => encode::run(a),
        Command::Score(a) => score::run(a),
        Command::Search(c) => search::run(c),
        Command::Serve(a) => serve::run(a),
        Command::Train(a) => train::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Selfcheck { device, seed } => selfcheck::run(device, seed),
        Command::Kernels => kernels::run(),
    };
    match result {
        Ok(code) => code,
        Err(e) if out::is_broken_pipe(&e) => ExitCode::from(out::BROKEN_PIPE_STATUS),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
