//! `m3 train`: fine-tuning with FlagEmbedding's flag names in kebab case (SPEC §5–6).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use m3::backend::Backend;
use m3::collective::{Collective, HostGroup, Solo, TcpGroup, ThreadGroup};
use m3::train::loss::KdLoss;
use m3::train::optim::AdamW;
use m3::train::options::TrainOptions;
use m3::train::trainer::{run_training, Progress, Silent, StepReport};
use m3::DType;

use super::clobber::{files_in, named, refuse_dir_holding_input, refuse_same_file};
use super::device::{on_device, on_rank, on_ranks, Job, RankJob};
use super::{ComputeArg, DeviceArg};

/// Learning-rate schedules.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerArg {
    /// Linear warm-up over `--warmup-ratio` of the steps, then linear decay to 0.
    Linear,
    /// The peak rate throughout.
    Constant,
}

/// Teacher-score losses.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KdArg {
    /// Hard-label CE plus CE against the teacher's distribution over the group.
    #[value(name = "kl_div", alias = "kl-div")]
    KlDiv,
    /// BGE-M3's per-passage masked CE weighted by the teacher.
    #[value(name = "m3_kd_loss", alias = "m3-kd-loss")]
    M3KdLoss,
}

/// `m3 train` flags. Defaults follow the paper's fine-tuning recipe.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Model directory to start from (config.json, weights, tokenizer; heads optional:
    /// missing ones start as PyTorch initialises a Linear).
    #[arg(long, alias = "model-name-or-path")]
    model: PathBuf,
    /// Training data: JSONL files or directories of them, one dataset per file (repeat
    /// the flag or give several paths); a name ending in `no_in_batch_neg` scores its
    /// queries only against their own group.
    #[arg(long, alias = "train-data", num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Where checkpoints (`checkpoint-N/`) and the final model go.
    #[arg(long)]
    output_dir: PathBuf,
    /// Queries per batch (for texts under 500 tokens; longer buckets take fewer).
    #[arg(long, default_value_t = 8)]
    per_device_train_batch_size: usize,
    /// Passages per query: one positive and G-1 negatives.
    #[arg(long, default_value_t = 8)]
    train_group_size: usize,
    /// Query truncation (tokens).
    #[arg(long, default_value_t = 32)]
    query_max_len: usize,
    /// Passage truncation (tokens).
    #[arg(long, default_value_t = 128)]
    passage_max_len: usize,
    /// Temperature τ of every score.
    #[arg(long, default_value_t = 0.02)]
    temperature: f32,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-5)]
    learning_rate: f32,
    /// Decoupled weight decay (not on biases and LayerNorm weights).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = SchedulerArg::Linear)]
    lr_scheduler_type: SchedulerArg,
    /// Warm-up fraction of the steps (linear schedule).
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    /// Warm-up steps (overrides --warmup-ratio).
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Stop after this many optimiser steps (overrides --num-train-epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Epochs over the data.
    #[arg(long, default_value_t = 1.0)]
    num_train_epochs: f64,
    /// Seed of shuffling, negative sampling, dropout and new heads (the same on every rank).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Batches in file order; each query's first positive and its negatives in order.
    #[arg(long)]
    no_shuffle: bool,
    /// Hidden-state dropout (default: the config's hidden_dropout_prob; 0 disables).
    #[arg(long)]
    dropout: Option<f32>,
    /// Encode at most N sequences at a time (two-pass recompute; same gradient, less memory).
    #[arg(long)]
    sub_batch_size: Option<usize>,
    /// Write a checkpoint every N steps.
    #[arg(long)]
    save_steps: Option<u64>,
    /// Keep at most N checkpoints, removing the oldest.
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Continue from the newest checkpoint in --output-dir.
    #[arg(long)]
    resume: bool,
    /// Start afresh in an --output-dir that holds checkpoints (removing them).
    #[arg(long, conflicts_with = "resume")]
    overwrite_output_dir: bool,
    /// Use teacher scores from the data (`pos_scores`, `neg_scores`); without this flag
    /// they are ignored, as in FlagEmbedding.
    #[arg(long)]
    knowledge_distillation: bool,
    /// Gradient-norm clipping (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Only the dense loss (no unified fine-tuning).
    #[arg(long)]
    dense_only: bool,
    /// Self-distillation on steps after this one (0-based; -1: from the first step).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    self_distill_start_step: i64,
    /// Turn self-distillation off.
    #[arg(long)]
    no_self_distill: bool,
    /// How teacher scores in the data (`pos_scores`, `neg_scores`) enter the loss.
    #[arg(long, value_enum, default_value_t = KdArg::M3KdLoss)]
    kd_loss_type: KdArg,
    /// Write one JSON object per optimiser step (loss, its parts, lr, grad_norm, tokens/s).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Compute precision: bf16 (GPU only) keeps f32 master weights, f32 AdamW moments and
    /// an f32 loss; checkpoints hold the f32 masters either way.
    #[arg(long, value_enum, default_value_t = ComputeArg::F32)]
    compute_dtype: ComputeArg,
    /// Where to run: auto means the GPU when one is present (f32 compute, naive attention
    /// kernels for now), else the CPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Data-parallel ranks in this process, one thread each (CUDA: GPU rank mod device
    /// count); the batch size stays per rank, as torchrun's `--nproc-per-node`.
    #[arg(long, alias = "nproc_per_node", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    nproc_per_node: u64,
    /// With several ranks, score each query against every rank's passages in the dense
    /// loss (FlagEmbedding's `--negatives_cross_device`).
    #[arg(long, alias = "negatives_cross_device")]
    negatives_cross_device: bool,
    /// Seconds a rank waits at a collective for the others before failing, naming them.
    #[arg(long, default_value_t = 1800.0)]
    collective_timeout: f64,
    /// How ranks exchange gradients (HF Trainer's `--ddp_backend`): `host` (through host
    /// memory: threads, or TCP between processes) or `nccl` (GPUs, processes started by a
    /// launcher; without one, a world of one rank).
    #[arg(long, alias = "ddp_backend", value_enum, default_value_t = DdpBackend::Host)]
    ddp_backend: DdpBackend,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DdpBackend {
    Host,
    Nccl,
}

impl TrainArgs {
    fn options(&self) -> TrainOptions {
        let mut o = TrainOptions::new(
            self.model.clone(),
            self.data.clone(),
            self.output_dir.clone(),
        );
        o.batch_size = self.per_device_train_batch_size;
        o.group = self.train_group_size;
        o.query_max_len = self.query_max_len;
        o.passage_max_len = self.passage_max_len;
        o.temperature = self.temperature;
        o.adamw = AdamW {
            lr: self.learning_rate,
            weight_decay: self.weight_decay,
            ..AdamW::default()
        };
        o.linear_schedule = self.lr_scheduler_type == SchedulerArg::Linear;
        o.warmup_ratio = self.warmup_ratio;
        o.warmup_steps = self.warmup_steps;
        o.max_steps = self.max_steps;
        o.epochs = self.num_train_epochs;
        o.seed = self.seed;
        o.shuffle = !self.no_shuffle;
        o.dropout = self.dropout;
        o.sub_batch = self.sub_batch_size;
        o.save_steps = self.save_steps;
        o.save_total_limit = self.save_total_limit;
        o.overwrite_output_dir = self.overwrite_output_dir;
        o.knowledge_distillation = self.knowledge_distillation;
        o.max_grad_norm = self.max_grad_norm;
        o.dense_only = self.dense_only;
        o.self_distill_start_step = self.self_distill_start_step;
        o.no_self_distill = self.no_self_distill;
        o.kd_loss = match self.kd_loss_type {
            KdArg::KlDiv => KdLoss::KlDiv,
            KdArg::M3KdLoss => KdLoss::M3KdLoss,
        };
        o.negatives_cross_device = self.negatives_cross_device;
        o
    }
}

impl TrainArgs {
    /// Refuses outputs that would overwrite or delete an input: `--metrics` naming a data
    /// or model file, an `--output-dir` (whose checkpoints m3 deletes and whose model files
    /// it replaces) holding the model or the data.
    fn check_paths(&self) -> anyhow::Result<()> {
        let mut inputs = files_in("--model", &self.model);
        inputs.push(named("--model", &self.model));
        for d in &self.data {
            if d.is_dir() {
                inputs.extend(files_in("--data", d));
            }
            inputs.push(named("--data", d));
        }
        if let Some(m) = &self.metrics {
            refuse_same_file(&[named("--metrics", m)], &inputs)?;
        }
        refuse_dir_holding_input(&named("--output-dir", &self.output_dir), &inputs)
    }
}

impl Job for TrainArgs {
    fn run<B: Backend>(self, be: &B, device_dtype: DType) -> anyhow::Result<ExitCode> {
        self.check_paths()?;
        let dtype = self.compute_dtype.dtype(device_dtype)?;
        run_training(
            be,
            self.options(),
            dtype,
            self.resume,
            self.metrics.as_deref(),
            &mut Bar::new(),
            &Solo,
        )?;
        eprintln!("wrote the trained model to {}", self.output_dir.display());
        Ok(ExitCode::SUCCESS)
    }
}

impl RankJob for TrainArgs {
    fn run_rank<B: Backend>(
        &self,
        be: &B,
        device_dtype: DType,
        comm: &dyn Collective<B>,
    ) -> anyhow::Result<()> {
        let dtype = self.compute_dtype.dtype(device_dtype)?;
        // Rank 0 reports and writes the metrics; the others only compute.
        let lead = comm.rank() == 0;
        let (mut bar, mut silent) = (Bar::new(), Silent);
        let progress: &mut dyn Progress = if lead { &mut bar } else { &mut silent };
        run_training(
            be,
            self.options(),
            dtype,
            self.resume,
            self.metrics.as_deref().filter(|_| lead),
            progress,
            comm,
        )
    }
}

/// The world a launcher (torchrun, SLURM `srun` with these exported, mpirun-style) set up
/// in the environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (the GPU; default the rank),
/// `MASTER_ADDR` (default 127.0.0.1) and `MASTER_PORT` (default 29500, torchrun's; one
/// more under torchrun, whose agent holds that port).
struct LauncherWorld {
    rank: usize,
    world: usize,
    local: usize,
    addr: String,
}

fn launcher_world() -> anyhow::Result<Option<LauncherWorld>> {
    let var = |k: &str| -> anyhow::Result<Option<usize>> {
        match std::env::var(k) {
            Err(_) => Ok(None),
            Ok(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| anyhow::anyhow!("{k}={v:?} is not a non-negative integer")),
        }
    };
    let Some(world) = var("WORLD_SIZE")?.filter(|&w| w > 1) else {
        return Ok(None);
    };
    let rank =
        var("RANK")?.ok_or_else(|| anyhow::anyhow!("WORLD_SIZE={world} is set but RANK is not"))?;
    if rank >= world {
        anyhow::bail!("RANK={rank} is not below WORLD_SIZE={world}");
    }
    let host = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let mut port = var("MASTER_PORT")?.unwrap_or(29500);
    // Under torchrun the agent's own store already listens at MASTER_PORT (it says so
    // with this variable, on every rank): rank 0 listens one port up.
    if std::env::var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Ok("True") {
        port += 1;
    }
    Ok(Some(LauncherWorld {
        rank,
        world,
        local: var("LOCAL_RANK")?.unwrap_or(rank),
        addr: format!("{host}:{port}"),
    }))
}

pub struct Bar {
    bar: ProgressBar,
    tty: bool,
    every: u64,
}

impl Bar {
    /// Progress for the current stderr.
    pub fn new() -> Self {
        Bar {
            bar: ProgressBar::hidden(),
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            every: 1,
        }
    }

    fn say(&self, text: String) {
        if self.tty {
            self.bar.println(text);
        } else {
            eprintln!("{text}");
        }
    }
}

impl Progress for Bar {
    fn start(&mut self, done: u64, total: u64) {
        self.every = (total / 20).max(1);
        if self.tty {
            self.bar = ProgressBar::new(total);
        }
        self.bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
                .expect("valid template"),
        );
        self.bar.set_position(done);
        self.bar.reset_eta();
    }

    fn warn(&mut self, message: &str) {
        self.say(format!("warning: {message}"));
    }

    fn step(&mut self, r: &StepReport, total: u64) {
        let status = format!(
            "loss {:.4} · {:.0} tok/s",
            r.loss.loss,
            r.tokens as f64 / r.seconds.max(1e-9)
        );
        self.bar.set_position(r.step);
        if !self.tty && (r.step.is_multiple_of(self.every) || r.step == total) {
            self.say(format!(
                "step {}/{total}: {status}, lr {:.3e}",
                r.step, r.lr
            ));
        }
        self.bar.set_message(status);
    }

    fn saved(&mut self, dir: &Path) {
        self.say(format!("wrote {}", dir.display()));
    }

    fn finish(&mut self) {
        self.bar.finish();
    }
}

/// Runs `m3 train`.
pub fn run(a: TrainArgs) -> anyhow::Result<ExitCode> {
    if !a.collective_timeout.is_finite() || a.collective_timeout <= 0.0 {
        anyhow::bail!("--collective-timeout must be a positive number of seconds");
    }
    let timeout = std::time::Duration::from_secs_f64(a.collective_timeout);
    let nccl = a.ddp_backend == DdpBackend::Nccl;
    let world = match launcher_world()? {
        // NCCL without a launcher: a world of one (the GPU bundle's check of the path).
        None if nccl => Some(LauncherWorld {
            rank: 0,
            world: 1,
            local: 0,
            addr: "127.0.0.1:0".into(),
        }),
        w => w,
    };
    if let Some(w) = world {
        if a.nproc_per_node > 1 {
            anyhow::bail!(
                "--nproc-per-node {} under a launcher that set WORLD_SIZE={}: give one or the other",
                a.nproc_per_node,
                w.world
            );
        }
        a.check_paths()?;
        let g = TcpGroup::join(&w.addr, w.rank, w.world, timeout)?;
        on_rank(a.device, w.local, nccl, &a, &HostGroup::Tcp(Arc::new(g)))?;
        if w.rank == 0 {
            eprintln!("wrote the trained model to {}", a.output_dir.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.nproc_per_node > 1 {
        if nccl {
            anyhow::bail!(
                "--ddp-backend nccl runs one process per GPU: start them with a launcher \
                 (torchrun --nproc-per-node {} --no-python m3 train ...)",
                a.nproc_per_node
            );
        }
        a.check_paths()?;
        let ranks = ThreadGroup::new(a.nproc_per_node as usize, timeout);
        on_ranks(a.device, ranks, &a)?;
        eprintln!("wrote the trained model to {}", a.output_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    // The CUDA training path passed on an H100 (2026-11-27: the 20-step loss curve within
    // 1% of the CPU's), so auto picks the GPU like every other command.
    on_device(a.device, a)
}
