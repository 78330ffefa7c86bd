//! The training loop (SPEC §5–6): one batch per step from the [`Feed`], the shared
//! [`train_step`], checkpoints that `m3 encode` loads and `--resume` continues from
//! bit-identically. The library reports through [`Progress`]; it never prints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;

use super::checkpoint::{self, checkpoints, fingerprint, SettingsDiffer, TrainState};
use super::feed::Feed;
use super::forward::{RankLoss, StepDropout};
use super::loss::LossValues;
use super::metrics::MetricsWriter;
use super::model::{Master, TrainModel};
use super::optim::Schedule;
use super::optimizer::Optimizer;
use super::options::{validate, TrainOptions};
use super::step::{train_step, NonFinite, StepInput};
use crate::backend::Backend;
use crate::collective::Collective;
use crate::tensor::DType;
use crate::text::TextTokenizer;

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// 1-based step number.
    pub step: u64,
    /// Loss and its parts.
    pub loss: LossValues,
    /// Learning rate used.
    pub lr: f32,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Tokens encoded (queries and passages).
    pub tokens: usize,
    /// Wall time of the step in seconds.
    pub seconds: f64,
}

impl StepReport {
    /// The `--metrics` line.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "step": self.step, "loss": self.loss.loss, "dense": self.loss.dense,
            "lr": self.lr, "grad_norm": self.grad_norm, "tokens": self.tokens,
            "tokens_per_s": self.tokens as f64 / self.seconds.max(1e-9), "seconds": self.seconds,
        });
        if let Some([s, c, e]) = self.loss.unified {
            v["sparse"] = json!(s);
            v["colbert"] = json!(c);
            v["ensemble"] = json!(e);
        }
        if let Some(d) = self.loss.distill {
            v["distill"] = json!(d);
        }
        v
    }
}

/// A training run in progress (one rank of it).
pub struct Trainer<'a, B: Backend> {
    be: &'a B,
    comm: &'a dyn Collective<B>,
    opts: TrainOptions,
    model: TrainModel<B>,
    opt: Optimizer<B>,
    feed: Feed,
    state: TrainState,
    total: u64,
    schedule: Schedule,
    /// The model directory's config and tokenizer files, read once at the start so every
    /// checkpoint holds them even after the one they came from is deleted by the
    /// retention limit.
    side_files: Vec<(&'static str, Vec<u8>)>,
    last_checkpoint: Option<PathBuf>,
    warnings: Vec<String>,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Loads the model (or, with `resume`, the newest checkpoint in the output directory),
    /// reads and validates all data, and plans the first epoch. `dtype` is the compute
    /// precision (the masters are always f32). `comm` joins the ranks of a data-parallel
    /// run ([`crate::collective::Solo`] for one); only rank 0 writes or removes files.
    pub fn new(
        be: &'a B,
        opts: TrainOptions,
        dtype: DType,
        resume: bool,
        comm: &'a dyn Collective<B>,
    ) -> anyhow::Result<Self> {
        validate(&opts)?;
        let (rank, world) = (comm.rank(), comm.world());
        let mut warnings = Vec::new();
        let found = checkpoints(&opts.output_dir);
        if !resume && !found.is_empty() {
            if !opts.overwrite_output_dir {
                bail!(
                    "{} already holds {} (and {} more checkpoint(s)); pass --resume to continue \
                     that run or --overwrite-output-dir to start afresh (removing them)",
                    opts.output_dir.display(),
                    found[0].display(),
                    found.len() - 1
                );
            }
            for c in found.iter().filter(|_| rank == 0) {
                std::fs::remove_dir_all(c)
                    .with_context(|| format!("{}: cannot remove", c.display()))?;
            }
        }
        if resume && found.is_empty() {
            bail!(
                "--resume: no checkpoint-N directory with trainer_state.json in {}",
                opts.output_dir.display()
            );
        }
        // The newest checkpoint that loads whole; a damaged one (say, from a crash during a
        // write that was not renamed into place) is skipped with a warning.
        let mut resumed = None;
        if resume {
            let now = fingerprint(&opts, world);
            for dir in &found {
                match checkpoint::load(be, dir, &now, opts.seed) {
                    Ok(r) => {
                        resumed = Some((dir.clone(), r));
                        break;
                    }
                    Err(e) if e.downcast_ref::<SettingsDiffer>().is_some() => return Err(e),
                    Err(e) => warnings.push(format!("skipping {}: {e:#}", dir.display())),
                }
            }
            if resumed.is_none() {
                bail!(
                    "--resume: no checkpoint in {} could be read",
                    opts.output_dir.display()
                );
            }
        }
        let (source, mut model, moments, state) = match resumed {
            Some((dir, r)) => (dir, r.model, Some(r.moments), r.state),
            None => {
                let model = TrainModel::load(be, &opts.model, DType::F32, opts.seed)?;
                let state = TrainState {
                    step: 0,
                    epoch: 0,
                    index: 0,
                };
                (opts.model.clone(), model, None, state)
            }
        };
        let opt = Optimizer::new(
            be,
            &mut model,
            dtype,
            opts.adamw,
            opts.max_grad_norm,
            moments.as_deref(),
        )?;
        let tokenizer = TextTokenizer::from_dir(&source)?;
        tokenizer.check_vocab(model.config.vocab_size, &source.join("config.json"))?;
        let side_files = checkpoint::read_side_files(&source, &opts.model)?;
        let feed = Feed::new(
            &opts,
            tokenizer,
            model.config.max_tokens(),
            state.epoch,
            (rank, world),
            &mut warnings,
        )?;
        let epoch_len = feed.epoch_len(&opts) as u64;
        let total = match opts.max_steps {
            Some(n) => n,
            None => (opts.epochs * epoch_len as f64).ceil() as u64,
        };
        let schedule = if opts.linear_schedule {
            match opts.warmup_steps {
                Some(w) => Schedule::Linear { warmup: w, total },
                None => Schedule::linear(opts.warmup_ratio, total),
            }
        } else {
            Schedule::Constant
        };
        // Rank 0 has removed what it had to before any rank goes on.
        comm.barrier()?;
        Ok(Trainer {
            be,
            comm,
            model,
            opt,
            feed,
            state,
            total,
            schedule,
            side_files,
            last_checkpoint: resume.then_some(source),
            warnings,
            opts,
        })
    }

    /// What the user should know about the data and the checkpoints (records with too few
    /// negatives, ignored fields, skipped damaged checkpoints).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Optimiser steps this run takes in all.
    pub fn total_steps(&self) -> u64 {
        self.total
    }

    /// Where training stands.
    pub fn state(&self) -> TrainState {
        self.state
    }

    /// Whether every step is done.
    pub fn finished(&self) -> bool {
        self.state.step >= self.total
    }

    /// The f32 master weights, copied to the host.
    pub fn masters_host(&mut self) -> anyhow::Result<Vec<Master>> {
        self.opt.masters_host(self.be, &mut self.model)
    }

    /// Runs one optimiser step. A non-finite loss or gradient is an error naming the step;
    /// the weights are left as they were before it.
    pub fn step(&mut self) -> anyhow::Result<StepReport> {
        let t0 = Instant::now();
        if !self.feed.has(self.state.epoch, self.state.index) {
            self.state.epoch += 1;
            self.state.index = 0;
        }
        let k = self.state.step;
        let o = &self.opts;
        let (batch, cfg, weight) =
            self.feed
                .batch(o, &self.model.config, self.state.epoch, self.state.index, k)?;
        let p = o.dropout.unwrap_or(self.model.config.hidden_dropout_prob);
        // Each rank its own masks (rank 0's are those of a one-rank run).
        let rank_mix = (self.comm.rank() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let dropout = StepDropout {
            p,
            seed: o.seed ^ (k + 1).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ rank_mix,
        };
        let rank = RankLoss {
            comm: self.comm,
            cross_device: o.negatives_cross_device,
            weight,
        };
        let lr = o.adamw.lr * self.schedule.factor(k);
        let input = StepInput {
            batch: &batch,
            loss: &cfg,
            dropout,
            sub_batch: o.sub_batch,
            t: k + 1,
            lr,
        };
        let out = match train_step(self.be, &mut self.model, &mut self.opt, &input, &rank) {
            Ok(out) => out,
            Err(e) => {
                let Some(nf) = e.downcast_ref::<NonFinite>() else {
                    return Err(e.context(format!("step {}", k + 1)));
                };
                let last = match &self.last_checkpoint {
                    Some(c) => format!("the last good checkpoint is {}", c.display()),
                    None => "no checkpoint was written yet".into(),
                };
                bail!(
                    "step {}: {nf}; training stopped before this step changed any weight ({last})",
                    k + 1
                );
            }
        };
        self.state.step += 1;
        self.state.index += 1;
        Ok(StepReport {
            step: self.state.step,
            loss: out.loss,
            lr,
            grad_norm: out.grad_norm,
            tokens: out.tokens,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Writes a checkpoint `checkpoint-N` (model files, optimiser and trainer state) into
    /// the output directory, whole or not at all; on ranks other than 0, nothing (`None`).
    pub fn save_checkpoint(&mut self) -> anyhow::Result<Option<PathBuf>> {
        if self.comm.rank() != 0 {
            return Ok(None);
        }
        let masters = self.masters_host()?;
        let moments = self.opt.moments_host(self.be)?;
        let dst = checkpoint::save(
            &self.opts.output_dir,
            &self.model,
            &masters,
            &moments,
            self.state,
            &self.opts,
            self.comm.world(),
            self.total,
            &self.side_files,
        )?;
        self.last_checkpoint = Some(dst.clone());
        Ok(Some(dst))
    }

    /// Writes the trained model into the output directory itself (rank 0 only), and waits
    /// until it is written on every rank.
    pub fn save_final(&mut self) -> anyhow::Result<()> {
        if self.comm.rank() == 0 {
            let masters = self.masters_host()?;
            checkpoint::save_final(
                &self.opts.output_dir,
                &self.model,
                &masters,
                &self.side_files,
            )?;
        }
        self.comm.barrier()?;
        Ok(())
    }
}

/// What a training run tells its caller as it goes (the CLI draws a progress bar).
pub trait Progress {
    /// Training starts at step `done` of `total`.
    fn start(&mut self, _done: u64, _total: u64) {}
    /// Something the user should know.
    fn warn(&mut self, _message: &str) {}
    /// A step finished.
    fn step(&mut self, _report: &StepReport, _total: u64) {}
    /// A checkpoint was written.
    fn saved(&mut self, _dir: &Path) {}
    /// The final model was written.
    fn finish(&mut self) {}
}

/// A [`Progress`] that ignores everything.
pub struct Silent;

impl Progress for Silent {}

/// Runs training to the end: metrics (one line per step, to `metrics`) and checkpoints
/// every `save_steps`, then the final model into the output directory. Every rank of a
/// data-parallel run calls it with its `comm`; give rank 0 the metrics and the progress.
#[allow(clippy::too_many_arguments)]
pub fn run_training<B: Backend>(
    be: &B,
    opts: TrainOptions,
    dtype: DType,
    resume: bool,
    metrics: Option<&Path>,
    progress: &mut dyn Progress,
    comm: &dyn Collective<B>,
) -> anyhow::Result<()> {
    let run = || -> anyhow::Result<()> {
        std::fs::create_dir_all(&opts.output_dir)
            .with_context(|| format!("{}: cannot create", opts.output_dir.display()))?;
        let save_steps = opts.save_steps;
        let mut trainer = Trainer::new(be, opts, dtype, resume, comm)?;
        for w in trainer.warnings() {
            progress.warn(w);
        }
        let mut metrics = metrics
            .map(|p| MetricsWriter::open(p, resume.then_some(trainer.state().step)))
            .transpose()?;
        progress.start(trainer.state().step, trainer.total_steps());
        while !trainer.finished() {
            let r = trainer.step()?;
            progress.step(&r, trainer.total_steps());
            if let Some(m) = &mut metrics {
                m.write(&r.to_json())?;
            }
            if save_steps.is_some_and(|n| n > 0 && r.step % n == 0) {
                if let Some(dir) = trainer.save_checkpoint()? {
                    progress.saved(&dir);
                }
            }
        }
        trainer.save_final()?;
        progress.finish();
        Ok(())
    };
    // A rank that fails tells the others, which stop at their next collective naming it.
    run().inspect_err(|e| comm.abort(&format!("{e:#}")))
}
