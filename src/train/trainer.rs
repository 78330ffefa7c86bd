//! The training loop (SPEC §5–6): data validated and bucketed up front, one batch per step
//! from the seeded plan, forward and backward (sub-batched on request), gradient-norm
//! clipping, AdamW on the f32 masters, compute copies refreshed, metrics, checkpoints that
//! `m3 encode` loads and `--resume` continues from bit-identically.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::atomic::{sync_dir_files, sync_path, StagedDir};
use crate::backend::Backend;
use crate::batch::pack_in_order;
use crate::model::checkpoint::{read_checkpoint, write_safetensors};
use crate::model::torch_save::write_torch_state_dict;
use crate::tensor::{DType, HostData, Tensor};
use crate::text::TextTokenizer;

use super::data::{load_all, make_batch, plan_epoch, BatchPlan, Dataset};
use super::forward::{step_grads, StepBatch, StepDropout};
use super::loss::{KdLoss, LossConfig, LossValues};
use super::model::{Master, TrainModel, SIDE_FILES};
use super::optim::{clip_factor, decays, step_scalars, AdamW, Moments, Schedule};

/// FlagEmbedding's per-bucket batch sizes for group size 8 on an 80 GB card (SPEC §6); the
/// per-device batch size is bucket 0's, longer buckets scale by this table.
pub const BUCKET_BATCH: [usize; 9] = [48, 32, 20, 18, 14, 14, 12, 10, 8];

/// Everything `m3 train` takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Model directory to start from.
    pub model: PathBuf,
    /// Training data: JSONL files or directories of them, one dataset per file.
    pub data: Vec<PathBuf>,
    /// Where checkpoints and the final model go.
    pub output_dir: PathBuf,
    /// Queries per batch (bucket 0; longer buckets scale by [`BUCKET_BATCH`]).
    pub batch_size: usize,
    /// Passages per query G.
    pub group: usize,
    /// Query truncation length (tokens).
    pub query_max_len: usize,
    /// Passage truncation length (tokens).
    pub passage_max_len: usize,
    /// Temperature τ.
    pub temperature: f32,
    /// Peak learning rate, weight decay and Adam constants.
    pub adamw: AdamW,
    /// Linear warm-up and decay (else constant).
    pub linear_schedule: bool,
    /// Warm-up fraction of the total steps (linear schedule).
    pub warmup_ratio: f64,
    /// Warm-up steps (overrides `warmup_ratio`, as in HF).
    pub warmup_steps: Option<u64>,
    /// Stop after this many steps (overrides `epochs`).
    pub max_steps: Option<u64>,
    /// Epochs over the data.
    pub epochs: f64,
    /// Seed of shuffling, sampling, dropout and new heads.
    pub seed: u64,
    /// Shuffle (else file order, first positive, negatives in order).
    pub shuffle: bool,
    /// Hidden dropout (None: the config's `hidden_dropout_prob`).
    pub dropout: Option<f32>,
    /// Encode at most this many sequences at a time (two-pass recompute).
    pub sub_batch: Option<usize>,
    /// Write a checkpoint every this many steps.
    pub save_steps: Option<u64>,
    /// Keep at most this many checkpoints (oldest removed).
    pub save_total_limit: Option<usize>,
    /// Start afresh in an output directory that already holds checkpoints (they are
    /// removed); without it such a directory is refused unless resuming.
    pub overwrite_output_dir: bool,
    /// Use teacher scores (`pos_scores`, `neg_scores`) from the data (FlagEmbedding's
    /// `--knowledge_distillation`); without it they are ignored.
    pub knowledge_distillation: bool,
    /// Gradient-norm clipping threshold (0 disables).
    pub max_grad_norm: f64,
    /// Only the dense loss.
    pub dense_only: bool,
    /// Self-distillation on steps after this one (0-based; -1: from the first).
    pub self_distill_start_step: i64,
    /// Turn self-distillation off.
    pub no_self_distill: bool,
    /// How teacher scores in the data are used.
    pub kd_loss: KdLoss,
}

/// A checkpoint exists but was written by a run with other settings.
#[derive(Debug)]
struct SettingsDiffer(String);

impl std::fmt::Display for SettingsDiffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SettingsDiffer {}

impl TrainOptions {
    /// The paper's fine-tuning recipe for `model` on `data` into `output_dir` (the `m3
    /// train` defaults): B 8, G 8, query/passage 32/128 tokens, τ 0.02, lr 1e-5 with linear
    /// 10% warm-up, weight decay 0.01, one epoch, seed 42, shuffled, config dropout,
    /// clipping 1.0, unified loss with self-distillation from the first step.
    pub fn new(model: PathBuf, data: Vec<PathBuf>, output_dir: PathBuf) -> Self {
        TrainOptions {
            model,
            data,
            output_dir,
            batch_size: 8,
            group: 8,
            query_max_len: 32,
            passage_max_len: 128,
            temperature: 0.02,
            adamw: AdamW::default(),
            linear_schedule: true,
            warmup_ratio: 0.1,
            warmup_steps: None,
            max_steps: None,
            epochs: 1.0,
            seed: 42,
            shuffle: true,
            dropout: None,
            sub_batch: None,
            save_steps: None,
            save_total_limit: None,
            overwrite_output_dir: false,
            knowledge_distillation: false,
            max_grad_norm: 1.0,
            dense_only: false,
            self_distill_start_step: -1,
            no_self_distill: false,
            kd_loss: KdLoss::M3KdLoss,
        }
    }
}

/// Where training stands; saved with every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Next batch within the epoch's plan.
    pub index: usize,
}

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

/// A training run in progress.
pub struct Trainer<'a, B: Backend> {
    be: &'a B,
    opts: TrainOptions,
    model: TrainModel<B>,
    /// f32 masters when compute runs in another dtype (bf16 on a GPU); `None` when the
    /// model's own f32 tensors are the masters (no copy).
    masters: Option<Vec<Tensor<B>>>,
    /// AdamW moments `[m, v]` per trainable tensor, f32, on the backend.
    moments: Vec<[Tensor<B>; 2]>,
    tokenizer: TextTokenizer,
    datasets: Vec<Dataset>,
    max_lens: Vec<Vec<usize>>,
    plan: Vec<BatchPlan>,
    state: TrainState,
    total: u64,
    schedule: Schedule,
    excluded: Vec<u32>,
    /// The model directory's config and tokenizer files, read once at the start so every
    /// checkpoint holds them even after the one they came from is deleted by the
    /// retention limit.
    side_files: Vec<(&'static str, Vec<u8>)>,
    last_checkpoint: Option<PathBuf>,
}

/// The options that must match for a resumed run to continue the same one (the
/// sub-batch size may change: the gradient is the same).
fn fingerprint(o: &TrainOptions) -> serde_json::Value {
    let data: Vec<PathBuf> = o
        .data
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let v = json!({
        "data": data, "batch_size": o.batch_size, "group": o.group, "seed": o.seed,
        "shuffle": o.shuffle, "query_max_len": o.query_max_len,
        "passage_max_len": o.passage_max_len, "temperature": o.temperature, "adamw": o.adamw,
        "linear_schedule": o.linear_schedule, "warmup_ratio": o.warmup_ratio,
        "warmup_steps": o.warmup_steps, "max_steps": o.max_steps, "epochs": o.epochs,
        "dropout": o.dropout, "max_grad_norm": o.max_grad_norm, "dense_only": o.dense_only,
        "self_distill_start_step": o.self_distill_start_step,
        "no_self_distill": o.no_self_distill, "kd_loss": o.kd_loss,
        "knowledge_distillation": o.knowledge_distillation,
    });
    // Each value as its JSON text: f32s read back from JSON as f64 need not print the
    // same, strings compare exactly.
    let map = v.as_object().expect("an object");
    serde_json::Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.to_string())))
            .collect(),
    )
}

/// The keys whose values differ between two fingerprints, as `key: was → now`.
fn differences(was: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let text =
        |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or("(none)").to_string();
    let empty = serde_json::Map::new();
    let now = now.as_object().unwrap_or(&empty);
    now.iter()
        .filter(|(k, v)| was.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: {} → {}", text(was.get(k)), text(Some(v))))
        .collect()
}

/// Every `checkpoint-N` directory under `dir` holding a trainer state, newest first.
fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (n, e.path()))
        })
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v.into_iter().map(|(_, p)| p).collect()
}

/// Validates the options a user can get wrong, naming the flag.
fn validate(o: &TrainOptions) -> anyhow::Result<()> {
    let check = |ok: bool, msg: String| {
        if ok {
            Ok(())
        } else {
            Err(anyhow::anyhow!(msg))
        }
    };
    check(
        o.batch_size > 0,
        "--per-device-train-batch-size must be at least 1".into(),
    )?;
    check(o.group > 0, "--train-group-size must be at least 1".into())?;
    check(
        o.query_max_len >= 3,
        format!(
            "--query-max-len must be at least 3 (CLS, one token, EOS), got {}",
            o.query_max_len
        ),
    )?;
    check(
        o.passage_max_len >= 3,
        format!(
            "--passage-max-len must be at least 3 (CLS, one token, EOS), got {}",
            o.passage_max_len
        ),
    )?;
    check(
        o.temperature > 0.0 && o.temperature.is_finite(),
        format!("--temperature must be positive, got {}", o.temperature),
    )?;
    check(
        o.adamw.lr >= 0.0 && o.adamw.lr.is_finite(),
        format!("--learning-rate must be ≥ 0, got {}", o.adamw.lr),
    )?;
    check(
        o.adamw.weight_decay >= 0.0 && o.adamw.weight_decay.is_finite(),
        format!("--weight-decay must be ≥ 0, got {}", o.adamw.weight_decay),
    )?;
    check(
        (0.0..=1.0).contains(&o.warmup_ratio),
        format!("--warmup-ratio must lie in [0, 1], got {}", o.warmup_ratio),
    )?;
    check(
        o.max_steps.is_some() || (o.epochs > 0.0 && o.epochs.is_finite()),
        format!("--num-train-epochs must be positive, got {}", o.epochs),
    )?;
    check(
        o.max_steps != Some(0),
        "--max-steps must be at least 1".into(),
    )?;
    if let Some(p) = o.dropout {
        check(
            (0.0..1.0).contains(&p),
            format!("--dropout must lie in [0, 1), got {p}"),
        )?;
    }
    check(
        o.sub_batch != Some(0),
        "--sub-batch-size must be at least 1".into(),
    )?;
    check(
        o.max_grad_norm >= 0.0 && !o.max_grad_norm.is_nan(),
        format!("--max-grad-norm must be ≥ 0, got {}", o.max_grad_norm),
    )?;
    Ok(())
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Loads the model (or, with `resume`, the newest checkpoint in the output directory),
    /// reads and validates all data, and plans the first epoch. `dtype` is the compute
    /// precision (the masters are always f32).
    pub fn new(be: &'a B, opts: TrainOptions, dtype: DType, resume: bool) -> anyhow::Result<Self> {
        validate(&opts)?;
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
            for c in &found {
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
            let now = fingerprint(&opts);
            for dir in &found {
                match Self::read_checkpoint_dir(be, dir, &now, opts.seed) {
                    Ok(r) => {
                        resumed = Some((dir.clone(), r));
                        break;
                    }
                    Err(e) if e.downcast_ref::<SettingsDiffer>().is_some() => return Err(e),
                    Err(e) => eprintln!("warning: skipping {}: {e:#}", dir.display()),
                }
            }
            if resumed.is_none() {
                bail!(
                    "--resume: no checkpoint in {} could be read",
                    opts.output_dir.display()
                );
            }
        }
        let source = resumed
            .as_ref()
            .map(|(d, _)| d.clone())
            .unwrap_or_else(|| opts.model.clone());
        let (mut model, host_moments, state) = match resumed {
            Some((_, r)) => r,
            None => {
                let model = TrainModel::load(be, &opts.model, DType::F32, opts.seed)?;
                let state = TrainState {
                    step: 0,
                    epoch: 0,
                    index: 0,
                };
                (model, None, state)
            }
        };
        let mut moments = Vec::new();
        for (k, (_, t)) in model.named_mut().into_iter().enumerate() {
            moments.push(match &host_moments {
                Some(h) => {
                    let mo: &Moments = &h[k];
                    [
                        be.upload(HostData::F32(&mo.m), t.shape())?,
                        be.upload(HostData::F32(&mo.v), t.shape())?,
                    ]
                }
                None => [
                    be.zeros(t.shape(), DType::F32)?,
                    be.zeros(t.shape(), DType::F32)?,
                ],
            });
        }
        let masters = split_masters(be, &mut model, dtype)?;
        let tokenizer = TextTokenizer::from_dir(&source)?;
        tokenizer.check_vocab(model.config.vocab_size, &source.join("config.json"))?;
        let side_files = read_side_files(&source, &opts.model)?;
        let sp = tokenizer.specials;
        let excluded: Vec<u32> = [Some(sp.cls), Some(sp.eos), sp.pad, sp.unk]
            .into_iter()
            .flatten()
            .collect();
        let datasets = load_all(&opts.data)?;
        check_group_size(&datasets, opts.group)?;
        let max_lens = datasets
            .iter()
            .map(|d| lengths(&tokenizer, d, &opts))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ignored: usize = datasets
            .iter()
            .map(|d| {
                d.records
                    .iter()
                    .filter(|r| r.kind.is_some() || r.prompt.is_some())
                    .count()
            })
            .sum();
        if ignored > 0 {
            eprintln!(
                "warning: {ignored} record(s) carry \"type\" or \"prompt\" fields, which m3 ignores \
                 (no instruction prefixes, no symmetric or classification batching)"
            );
        }
        let epoch_len = plan_epoch(
            &max_lens,
            &batch_size_fn(&opts, &datasets),
            1,
            opts.seed,
            0,
            opts.shuffle,
        )
        .len() as u64;
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
        let found_resumed = resume.then(|| source.clone());
        let plan = plan_epoch(
            &max_lens,
            &batch_size_fn(&opts, &datasets),
            1,
            opts.seed,
            state.epoch,
            opts.shuffle,
        );
        Ok(Trainer {
            be,
            model,
            masters,
            moments,
            tokenizer,
            datasets,
            max_lens,
            plan,
            state,
            total,
            schedule,
            excluded,
            side_files,
            last_checkpoint: found_resumed,
            opts,
        })
    }

    /// Reads a checkpoint written by [`Trainer::save_checkpoint`]: model (f32), AdamW
    /// moments and state, after checking it came from a run with these settings.
    #[allow(clippy::type_complexity)]
    fn read_checkpoint_dir(
        be: &B,
        dir: &Path,
        now: &serde_json::Value,
        seed: u64,
    ) -> anyhow::Result<(TrainModel<B>, Option<Vec<Moments>>, TrainState)> {
        let path = dir.join("trainer_state.json");
        let saved: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
        )
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let diff = differences(&saved["fingerprint"], now);
        if !diff.is_empty() {
            return Err(SettingsDiffer(format!(
                "--resume: {} was written by a run with other settings: {}",
                dir.display(),
                diff.join(", ")
            ))
            .into());
        }
        let state: TrainState = serde_json::from_value(saved["state"].clone())
            .with_context(|| format!("{}: no valid \"state\"", path.display()))?;
        let mut model = TrainModel::load(be, dir, DType::F32, seed)?;
        let masters = model.masters(be)?;
        let moments = read_moments(&dir.join("optimizer.safetensors"), &masters)?;
        Ok((model, Some(moments), state))
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
        let be = self.be;
        let names: Vec<String> = self.model.named_mut().into_iter().map(|(n, _)| n).collect();
        let tensors: Vec<&Tensor<B>> = match &self.masters {
            Some(m) => m.iter().collect(),
            None => self
                .model
                .named_mut()
                .into_iter()
                .map(|(_, t)| &*t)
                .collect(),
        };
        names
            .into_iter()
            .zip(tensors)
            .map(|(name, t)| {
                Ok(Master {
                    shape: t.shape().to_vec(),
                    data: be.to_vec_f32(t)?,
                    name,
                })
            })
            .collect()
    }

    /// Runs one optimiser step. A non-finite loss or gradient is an error naming the step;
    /// the weights are left as they were before it.
    pub fn step(&mut self) -> anyhow::Result<StepReport> {
        let t0 = Instant::now();
        if self.state.index >= self.plan.len() {
            self.state.epoch += 1;
            self.state.index = 0;
            self.plan = plan_epoch(
                &self.max_lens,
                &batch_size_fn(&self.opts, &self.datasets),
                1,
                self.opts.seed,
                self.state.epoch,
                self.opts.shuffle,
            );
        }
        let k = self.state.step;
        let o = &self.opts;
        let plan = &self.plan[self.state.index];
        let ds = &self.datasets[plan.dataset];
        let tb = make_batch(
            ds,
            plan,
            0,
            1,
            o.group,
            o.seed,
            self.state.epoch,
            k,
            o.shuffle,
        );
        let offset = self.model.config.position_offset();
        let enc = |texts: &[String], max: usize| -> anyhow::Result<Vec<crate::text::Encoded>> {
            texts
                .iter()
                .map(|t| self.tokenizer.encode(t, max, false))
                .collect()
        };
        let max_tokens = self.model.config.max_tokens();
        let batch = StepBatch {
            q: pack_in_order(&enc(&tb.queries, o.query_max_len.min(max_tokens))?, offset),
            p: pack_in_order(
                &enc(&tb.passages, o.passage_max_len.min(max_tokens))?,
                offset,
            ),
        };
        let cfg = LossConfig {
            temperature: o.temperature,
            group: o.group,
            dense_only: o.dense_only,
            self_distill: !o.no_self_distill && (k as i64) > o.self_distill_start_step,
            excluded: self.excluded.clone(),
            in_batch_neg: !tb.no_in_batch_neg,
            teacher: tb
                .teacher
                .clone()
                .filter(|_| o.knowledge_distillation)
                .map(|t| (t, o.kd_loss)),
            masked_columns: tb
                .filler
                .iter()
                .enumerate()
                .filter_map(|(c, &f)| f.then_some(c))
                .collect(),
        };
        let p = o.dropout.unwrap_or(self.model.config.hidden_dropout_prob);
        let dropout = StepDropout {
            p,
            seed: o.seed ^ (k + 1).wrapping_mul(0x2545_F491_4F6C_DD1D),
        };
        let (loss, grads) = step_grads(self.be, &self.model, &batch, &cfg, dropout, o.sub_batch)
            .with_context(|| format!("step {}", k + 1))?;
        let norm = grad_norm(self.be, &grads)?;
        if !loss.loss.is_finite() || !norm.is_finite() {
            let last = match &self.last_checkpoint {
                Some(c) => format!("the last good checkpoint is {}", c.display()),
                None => "no checkpoint was written yet".into(),
            };
            bail!(
                "step {}: the loss is {} and the gradient norm {norm}; training stopped before \
                 this step changed any weight ({last})",
                k + 1,
                loss.loss
            );
        }
        let lr = o.adamw.lr * self.schedule.factor(k);
        let tokens = batch.q.tokens() + batch.p.tokens();
        let clip = if o.max_grad_norm > 0.0 {
            clip_factor(norm, o.max_grad_norm)
        } else {
            1.0
        };
        update(
            self.be,
            &mut self.model,
            &mut self.masters,
            &mut self.moments,
            &grads,
            k + 1,
            lr,
            clip,
            &o.adamw,
        )?;
        self.state.step += 1;
        self.state.index += 1;
        Ok(StepReport {
            step: self.state.step,
            loss,
            lr,
            grad_norm: norm,
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Writes a checkpoint `checkpoint-N` (model files, optimiser and trainer state) into
    /// the output directory, under a temporary name renamed into place when complete.
    pub fn save_checkpoint(&mut self) -> anyhow::Result<PathBuf> {
        let out = &self.opts.output_dir.clone();
        let dst = out.join(format!("checkpoint-{}", self.state.step));
        // Built beside its final name and swapped in whole: a crash leaves the whole
        // checkpoint or none, and leftovers of a crashed save are removed by the next one.
        let stage = StagedDir::new(&dst)?;
        let tmp = stage.path().to_path_buf();
        let masters = self.masters_host()?;
        self.write_model(&tmp, &masters)?;
        let moments: Vec<[Vec<f32>; 2]> = self
            .moments
            .iter()
            .map(|[m, v]| Ok([self.be.to_vec_f32(m)?, self.be.to_vec_f32(v)?]))
            .collect::<anyhow::Result<_>>()?;
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for (m, [em, ev]) in masters.iter().zip(&moments) {
            tensors.push((format!("exp_avg.{}", m.name), m.shape.clone(), em));
            tensors.push((format!("exp_avg_sq.{}", m.name), m.shape.clone(), ev));
        }
        write_safetensors(&tmp.join("optimizer.safetensors"), &tensors)?;
        let state = json!({
            "state": self.state, "fingerprint": fingerprint(&self.opts),
            "total_steps": self.total, "options": self.opts,
        });
        let state_path = tmp.join("trainer_state.json");
        std::fs::write(&state_path, serde_json::to_vec_pretty(&state)?)
            .with_context(|| format!("{}: cannot write", state_path.display()))?;
        stage.commit()?;
        self.last_checkpoint = Some(dst.clone());
        if let Some(limit) = self.opts.save_total_limit {
            for old in checkpoints(out).into_iter().skip(limit.max(1)) {
                std::fs::remove_dir_all(&old)
                    .with_context(|| format!("{}: cannot remove", old.display()))?;
            }
        }
        Ok(dst)
    }

    /// Writes the trained model into the output directory itself (each file renamed into
    /// place once written).
    pub fn save_final(&mut self) -> anyhow::Result<()> {
        let masters = self.masters_host()?;
        let out = &self.opts.output_dir;
        let tmp = out.join(".final.tmp");
        fresh_dir(&tmp)?;
        self.write_model(&tmp, &masters)?;
        sync_dir_files(&tmp)?;
        let list = |e| anyhow::anyhow!("{}: cannot list: {e}", tmp.display());
        for e in std::fs::read_dir(&tmp).map_err(list)? {
            let e = e.map_err(list)?;
            let dst = out.join(e.file_name());
            std::fs::rename(e.path(), &dst)
                .with_context(|| format!("{}: cannot rename into place", dst.display()))?;
        }
        std::fs::remove_dir(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
        sync_path(out)
    }

    /// The published layout: model.safetensors (PyTorch's names and `[out, in]` linear
    /// weights), `colbert_linear.pt` and `sparse_linear.pt`, and the source's config and
    /// tokenizer files.
    fn write_model(&self, dir: &Path, masters: &[Master]) -> anyhow::Result<()> {
        let h = self.model.config.hidden_size;
        let mut encoder: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut heads: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for m in masters {
            let (shape, data) = m.torch_layout();
            if m.name == "embeddings.token_type_embeddings.weight" {
                let mut all = data;
                all.extend_from_slice(&self.model.token_type_rest);
                let rows = all.len() / h;
                encoder.push((m.name.clone(), vec![rows, h], all));
            } else if m.name.contains("_linear.") {
                heads.push((m.name.clone(), shape, data));
            } else {
                encoder.push((m.name.clone(), shape, data));
            }
        }
        for (name, t) in &self.model.untouched {
            encoder.push((name.clone(), t.shape.clone(), t.data.clone()));
        }
        let view = |v: &[(String, Vec<usize>, Vec<f32>)],
                    strip: &str|
         -> Vec<(String, Vec<usize>, Vec<f32>)> {
            v.iter()
                .filter(|(n, _, _)| n.starts_with(strip))
                .map(|(n, s, d)| (n[strip.len()..].to_string(), s.clone(), d.clone()))
                .collect()
        };
        let write = |path: PathBuf, v: &[(String, Vec<usize>, Vec<f32>)]| {
            let t: Vec<(String, Vec<usize>, &[f32])> = v
                .iter()
                .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
                .collect();
            write_safetensors(&path, &t)
        };
        write(dir.join("model.safetensors"), &encoder)?;
        // Heads as the published `.pt` files FlagEmbedding's `torch.load` reads.
        for stem in ["colbert_linear", "sparse_linear"] {
            let v = view(&heads, &format!("{stem}."));
            let t: Vec<(String, Vec<usize>, &[f32])> = v
                .iter()
                .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
                .collect();
            write_torch_state_dict(&dir.join(format!("{stem}.pt")), &t)?;
        }
        for (name, bytes) in &self.side_files {
            let path = dir.join(name);
            std::fs::write(&path, bytes)
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients: each tensor's `Σ g²` in f64 on its backend, added
/// in tensor order (the same bits on any thread count).
pub fn grad_norm<B: Backend>(be: &B, grads: &[Option<Tensor<B>>]) -> anyhow::Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += be.sum_squares(g)?;
    }
    Ok(total.sqrt())
}

/// AdamW step `t` (1-based) at rate `lr` on every parameter that has a gradient, gradients
/// scaled by `clip`, in place on the backend; a parameter the loss does not reach gets no
/// update, as PyTorch skips parameters whose `grad` is `None`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_apply<B: Backend>(
    be: &B,
    params: Vec<(&str, &mut Tensor<B>)>,
    moments: &mut [[Tensor<B>; 2]],
    grads: &[Option<Tensor<B>>],
    t: u64,
    lr: f32,
    clip: f32,
    h: &AdamW,
) -> anyhow::Result<()> {
    for (((name, p), [m, v]), g) in params.into_iter().zip(moments.iter_mut()).zip(grads) {
        if let Some(g) = g {
            let s = step_scalars(t, lr, decays(name), clip, h);
            be.adamw(p, g, m, v, &s)
                .with_context(|| format!("AdamW on {name}"))?;
        }
    }
    Ok(())
}

/// Zeroed f32 AdamW moments `[m, v]` for every tensor of `model`, in its order.
pub fn zero_moments<B: Backend>(
    be: &B,
    model: &mut TrainModel<B>,
) -> crate::error::Result<Vec<[Tensor<B>; 2]>> {
    model
        .named_mut()
        .into_iter()
        .map(|(_, t)| {
            Ok([
                be.zeros(t.shape(), DType::F32)?,
                be.zeros(t.shape(), DType::F32)?,
            ])
        })
        .collect()
}

/// The f32 tensors AdamW updates for a model computing in `dtype`: `None` with f32 compute
/// (the model's own tensors are the masters, no copy), else f32 copies of every tensor,
/// and the model itself cast to `dtype` (bf16 compute copies on a GPU).
pub fn split_masters<B: Backend>(
    be: &B,
    model: &mut TrainModel<B>,
    dtype: DType,
) -> anyhow::Result<Option<Vec<Tensor<B>>>> {
    if dtype == DType::F32 {
        return Ok(None);
    }
    let copies = model
        .named_mut()
        .into_iter()
        .map(|(_, t)| be.cast(t, DType::F32))
        .collect::<crate::error::Result<Vec<_>>>()?;
    model.cast(be, dtype)?;
    Ok(Some(copies))
}

/// One optimiser update: AdamW step `t` on the masters (the model's own f32 tensors when
/// `masters` is `None`), then the compute copies refreshed from them on the device.
#[allow(clippy::too_many_arguments)]
pub fn update<B: Backend>(
    be: &B,
    model: &mut TrainModel<B>,
    masters: &mut Option<Vec<Tensor<B>>>,
    moments: &mut [[Tensor<B>; 2]],
    grads: &[Option<Tensor<B>>],
    t: u64,
    lr: f32,
    clip: f32,
    h: &AdamW,
) -> anyhow::Result<()> {
    let mut named = model.named_mut();
    let params: Vec<(&str, &mut Tensor<B>)> = match masters {
        None => named
            .iter_mut()
            .map(|(n, t)| (n.as_str(), &mut **t))
            .collect(),
        Some(masters) => named
            .iter()
            .map(|(n, _)| n.as_str())
            .zip(masters.iter_mut())
            .collect(),
    };
    adamw_apply(be, params, moments, grads, t, lr, clip, h)?;
    if let Some(masters) = masters {
        for ((_, t), m) in named.iter_mut().zip(masters.iter()) {
            **t = be.cast(m, t.dtype())?;
        }
    }
    Ok(())
}

/// Refuses a group size no record can fill (it would only repeat negatives, and memory
/// grows with it), and warns, once, how many records have too few negatives.
fn check_group_size(datasets: &[Dataset], group: usize) -> anyhow::Result<()> {
    let want = group - 1;
    let records = datasets.iter().flat_map(|d| &d.records);
    let most = records.clone().map(|r| r.neg.len()).max().unwrap_or(0);
    if want > most {
        bail!(
            "--train-group-size {group} needs {want} negatives per query, but no record in \
             the data has more than {most}; use --train-group-size {} or less",
            most + 1
        );
    }
    let short = records.clone().filter(|r| r.neg.len() < want).count();
    if short > 0 {
        eprintln!(
            "warning: {short} of {} record(s) have fewer than {want} negatives: their \
             negatives are repeated to fill the group of {group} (records with none train \
             against in-batch negatives only)",
            records.count()
        );
    }
    Ok(())
}

/// The config and tokenizer files ([`SIDE_FILES`]) of `source` (the model directory or the
/// checkpoint resumed from), each taken from `model` where `source` lacks it (checkpoints
/// of older m3 versions could lose them); `config.json` and `tokenizer.json` must exist.
fn read_side_files(source: &Path, model: &Path) -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    let mut out = Vec::new();
    for f in SIDE_FILES {
        let found = [source.join(f), model.join(f)]
            .into_iter()
            .find(|p| p.is_file());
        match found {
            Some(p) => {
                let bytes =
                    std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
                out.push((f, bytes));
            }
            None if f == "config.json" || f == "tokenizer.json" => bail!(
                "{}: missing (and not in {} either)",
                source.join(f).display(),
                model.display()
            ),
            None => {}
        }
    }
    Ok(out)
}

/// An empty directory at `dir` (an old one, say from a crash mid-write, is removed).
fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("{}: cannot remove", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))
}

/// The per-device batch size of `bucket` for dataset `d`: the dataset's own (its first
/// record's `batch_size`, used as is, as FlagEmbedding does), else the option's scaled
/// down for longer buckets by [`BUCKET_BATCH`].
fn batch_size_fn<'o>(
    o: &'o TrainOptions,
    ds: &'o [Dataset],
) -> impl Fn(usize, usize) -> usize + 'o {
    move |bucket, d| {
        let base = ds[d].batch_size.unwrap_or(o.batch_size);
        (base * BUCKET_BATCH[bucket.min(8)])
            .div_ceil(BUCKET_BATCH[0])
            .max(1)
    }
}

/// Token length of each record's longest text (query, positives, negatives), truncated as
/// training will; a text the tokenizer rejects is an error naming file and record.
fn lengths(tok: &TextTokenizer, d: &Dataset, o: &TrainOptions) -> anyhow::Result<Vec<usize>> {
    d.records
        .par_iter()
        .map(|r| {
            let q = tok.encode(&r.query, o.query_max_len, false)?.ids.len();
            let mut m = q;
            for p in r.pos.iter().chain(&r.neg) {
                m = m.max(tok.encode(p, o.passage_max_len, false)?.ids.len());
            }
            Ok(m)
        })
        .collect::<Vec<anyhow::Result<usize>>>()
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.with_context(|| d.source(i)))
        .collect()
}

/// AdamW moments saved by [`Trainer::save_checkpoint`], checked against the masters.
fn read_moments(path: &Path, masters: &[Master]) -> anyhow::Result<Vec<Moments>> {
    let mut all = read_checkpoint(path)?;
    masters
        .iter()
        .map(|m| {
            let mut get = |k: &str| -> anyhow::Result<Vec<f32>> {
                let key = format!("{k}.{}", m.name);
                let t = all
                    .remove(&key)
                    .with_context(|| format!("{}: tensor {key} is missing", path.display()))?;
                if t.shape != m.shape {
                    bail!(
                        "{}: tensor {key} has shape {:?}, expected {:?}",
                        path.display(),
                        t.shape,
                        m.shape
                    );
                }
                Ok(t.data)
            };
            Ok(Moments {
                m: get("exp_avg")?,
                v: get("exp_avg_sq")?,
            })
        })
        .collect()
}

/// Runs training to the end with a progress bar on stderr (unless `quiet`), metrics and
/// checkpoints every `save_steps`, then writes the final model into the output directory.
pub fn run_training<B: Backend>(
    be: &B,
    opts: TrainOptions,
    dtype: DType,
    resume: bool,
    metrics: Option<&Path>,
    quiet: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.output_dir)
        .with_context(|| format!("{}: cannot create", opts.output_dir.display()))?;
    let save_steps = opts.save_steps;
    let mut trainer = Trainer::new(be, opts, dtype, resume)?;
    let mut metrics = metrics
        .map(|p| MetricsWriter::open(p, resume.then_some(trainer.state().step)))
        .transpose()?;
    // A terminal gets a live bar; a log file (nohup, a batch job) a plain line every 5%
    // of the steps and at each checkpoint.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let every = (trainer.total_steps() / 20).max(1);
    let bar = if quiet || !tty {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(trainer.total_steps())
    };
    let say = |text: String| {
        if quiet {
        } else if tty {
            bar.println(text);
        } else {
            eprintln!("{text}");
        }
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_position(trainer.state().step);
    bar.reset_eta();
    while !trainer.finished() {
        let r = trainer.step()?;
        let status = format!(
            "loss {:.4} · {:.0} tok/s",
            r.loss.loss,
            r.tokens as f64 / r.seconds.max(1e-9)
        );
        bar.set_position(r.step);
        if !tty && (r.step % every == 0 || r.step == trainer.total_steps()) {
            say(format!(
                "step {}/{}: {status}, lr {:.3e}",
                r.step,
                trainer.total_steps(),
                r.lr
            ));
        }
        bar.set_message(status);
        if let Some(m) = &mut metrics {
            m.write(&r.to_json())?;
        }
        if save_steps.is_some_and(|n| n > 0 && r.step % n == 0) {
            let dir = trainer.save_checkpoint()?;
            say(format!("wrote {}", dir.display()));
        }
    }
    trainer.save_final()?;
    bar.finish();
    Ok(())
}

/// Appends one JSON object per line to a metrics file.
pub struct MetricsWriter {
    out: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens a metrics file: truncated for a fresh run; when resuming after step `n`, with
    /// the lines of steps up to `n` kept (later ones, from the run that crashed, dropped).
    /// The kept lines replace the file through a temporary file and a rename, so a crash
    /// while rewinding loses none of them.
    pub fn open(path: &Path, resumed_at: Option<u64>) -> anyhow::Result<Self> {
        let io = |e: std::io::Error| anyhow::anyhow!("{}: cannot write: {e}", path.display());
        let mut keep = String::new();
        if let (Some(n), Ok(old)) = (resumed_at, std::fs::read_to_string(path)) {
            for line in old.lines() {
                let step = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["step"].as_u64());
                if step.is_some_and(|s| s <= n) {
                    keep.push_str(line);
                    keep.push('\n');
                }
            }
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".m3-tmp");
        let tmp = PathBuf::from(tmp_name);
        std::fs::write(&tmp, keep.as_bytes())
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(io)?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        Ok(MetricsWriter {
            out: std::io::BufWriter::new(f),
            path: path.to_path_buf(),
        })
    }

    /// Writes one line and flushes it, so a crash keeps every finished step.
    pub fn write(&mut self, v: &serde_json::Value) -> anyhow::Result<()> {
        let io = |e: std::io::Error| anyhow::anyhow!("{}: cannot write: {e}", self.path.display());
        writeln!(self.out, "{v}").map_err(io)?;
        self.out.flush().map_err(io)?;
        Ok(())
    }
}
