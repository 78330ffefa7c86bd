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

use crate::backend::Backend;
use crate::batch::pack_in_order;
use crate::model::checkpoint::{read_checkpoint, write_safetensors};
use crate::model::torch_save::write_torch_state_dict;
use crate::tensor::DType;
use crate::text::TextTokenizer;

use super::data::{load, make_batch, plan_epoch, BatchPlan, Dataset};
use super::forward::{step_grads, StepBatch, StepDropout};
use super::loss::{KdLoss, LossConfig, LossValues};
use super::model::{Master, TrainModel, SIDE_FILES};
use super::optim::{clip_factor, decays, step as adamw_step, AdamW, Moments, Schedule};

/// FlagEmbedding's per-bucket batch sizes for group size 8 on an 80 GB card (SPEC §6); the
/// per-device batch size is bucket 0's, longer buckets scale by this table.
pub const BUCKET_BATCH: [usize; 9] = [48, 32, 20, 18, 14, 14, 12, 10, 8];

/// Everything `m3 train` takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Model directory to start from.
    pub model: PathBuf,
    /// Training data: a JSONL file or a directory of them.
    pub data: PathBuf,
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
    masters: Vec<Master>,
    moments: Vec<Moments>,
    tokenizer: TextTokenizer,
    datasets: Vec<Dataset>,
    max_lens: Vec<Vec<usize>>,
    plan: Vec<BatchPlan>,
    state: TrainState,
    total: u64,
    schedule: Schedule,
    excluded: Vec<u32>,
    source: PathBuf,
    last_checkpoint: Option<PathBuf>,
}

/// The newest `checkpoint-N` directory under `dir` holding a trainer state.
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// The options that must match for a resumed run to continue the same one.
fn fingerprint(o: &TrainOptions) -> serde_json::Value {
    json!({
        "data": o.data, "batch_size": o.batch_size, "group": o.group, "seed": o.seed,
        "shuffle": o.shuffle, "query_max_len": o.query_max_len,
        "passage_max_len": o.passage_max_len, "sub_batch": o.sub_batch,
    })
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Loads the model (or, with `resume`, the newest checkpoint in the output directory),
    /// reads and validates all data, and plans the first epoch. `dtype` is the compute
    /// precision (the masters are always f32).
    pub fn new(be: &'a B, opts: TrainOptions, dtype: DType, resume: bool) -> anyhow::Result<Self> {
        if opts.batch_size == 0 || opts.group == 0 {
            bail!("--per-device-train-batch-size and --train-group-size must be at least 1");
        }
        if opts.temperature.is_nan() || opts.temperature <= 0.0 {
            bail!("--temperature must be positive, got {}", opts.temperature);
        }
        let resume_from = if resume {
            let c = latest_checkpoint(&opts.output_dir).with_context(|| {
                format!(
                    "--resume: no checkpoint-N directory with trainer_state.json in {}",
                    opts.output_dir.display()
                )
            })?;
            Some(c)
        } else {
            None
        };
        let source = resume_from.clone().unwrap_or_else(|| opts.model.clone());
        let mut model = TrainModel::load(be, &source, DType::F32, opts.seed)?;
        let masters = model.masters(be)?;
        if dtype != DType::F32 {
            model.cast(be, dtype)?;
        }
        let tokenizer = TextTokenizer::from_dir(&source)?;
        let sp = tokenizer.specials;
        let excluded: Vec<u32> = [Some(sp.cls), Some(sp.eos), sp.pad, sp.unk]
            .into_iter()
            .flatten()
            .collect();
        let datasets = load(&opts.data)?;
        let max_lens = datasets
            .iter()
            .map(|d| lengths(&tokenizer, d, &opts))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut moments: Vec<Moments> = masters
            .iter()
            .map(|m| Moments::zeros(m.data.len()))
            .collect();
        let mut state = TrainState {
            step: 0,
            epoch: 0,
            index: 0,
        };
        if let Some(dir) = &resume_from {
            let saved: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dir.join("trainer_state.json")).with_context(|| {
                    format!("{}: cannot read trainer_state.json", dir.display())
                })?,
            )?;
            let was = &saved["fingerprint"];
            let now = fingerprint(&opts);
            if *was != now {
                bail!(
                    "--resume: {} was written by a run with other settings ({was}); this run has {now}",
                    dir.display()
                );
            }
            state = serde_json::from_value(saved["state"].clone())
                .with_context(|| format!("{}: bad trainer_state.json", dir.display()))?;
            moments = read_moments(&dir.join("optimizer.safetensors"), &masters)?;
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
            Schedule::linear(opts.warmup_ratio, total)
        } else {
            Schedule::Constant
        };
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
            source: opts.model.clone(),
            opts,
            last_checkpoint: resume_from,
        })
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

    /// The f32 master weights.
    pub fn masters(&self) -> &[Master] {
        &self.masters
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
            teacher: tb.teacher.clone().map(|t| (t, o.kd_loss)),
        };
        let p = o.dropout.unwrap_or(self.model.config.hidden_dropout_prob);
        let dropout = StepDropout {
            p,
            seed: o.seed ^ (k + 1).wrapping_mul(0x2545_F491_4F6C_DD1D),
        };
        let (loss, grads) = step_grads(self.be, &self.model, &batch, &cfg, dropout, o.sub_batch)
            .with_context(|| format!("step {}", k + 1))?;
        let grads = host_grads(self.be, grads)?;
        let norm = global_norm(&grads);
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
        adamw_update(
            &mut self.masters,
            &mut self.moments,
            grads,
            k + 1,
            lr,
            norm,
            o,
        );
        self.model.refresh(self.be, &self.masters)?;
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
        let out = &self.opts.output_dir;
        let name = format!("checkpoint-{}", self.state.step);
        let tmp = out.join(format!(".{name}.tmp"));
        let dst = out.join(&name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        self.write_model(&tmp)?;
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for (m, mo) in self.masters.iter().zip(&self.moments) {
            tensors.push((format!("exp_avg.{}", m.name), m.shape.clone(), &mo.m));
            tensors.push((format!("exp_avg_sq.{}", m.name), m.shape.clone(), &mo.v));
        }
        write_safetensors(&tmp.join("optimizer.safetensors"), &tensors)?;
        let state = json!({
            "state": self.state, "fingerprint": fingerprint(&self.opts),
            "total_steps": self.total, "options": self.opts,
        });
        std::fs::write(
            tmp.join("trainer_state.json"),
            serde_json::to_vec_pretty(&state)?,
        )?;
        if dst.exists() {
            std::fs::remove_dir_all(&dst)?;
        }
        std::fs::rename(&tmp, &dst)
            .with_context(|| format!("{}: cannot rename into place", dst.display()))?;
        self.last_checkpoint = Some(dst.clone());
        Ok(dst)
    }

    /// Writes the trained model into the output directory itself (each file renamed into
    /// place once written).
    pub fn save_final(&self) -> anyhow::Result<()> {
        let out = &self.opts.output_dir;
        let tmp = out.join(".final.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        self.write_model(&tmp)?;
        for e in std::fs::read_dir(&tmp)? {
            let e = e?;
            std::fs::rename(e.path(), out.join(e.file_name()))?;
        }
        std::fs::remove_dir(&tmp)?;
        Ok(())
    }

    /// The published layout: model.safetensors (PyTorch's names and `[out, in]` linear
    /// weights), `colbert_linear.pt` and `sparse_linear.pt`, and the source's config and
    /// tokenizer files.
    fn write_model(&self, dir: &Path) -> anyhow::Result<()> {
        let h = self.model.config.hidden_size;
        let mut encoder: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut heads: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for m in &self.masters {
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
        for f in SIDE_FILES {
            let src = self.source.join(f);
            if src.exists() {
                std::fs::copy(&src, dir.join(f))
                    .with_context(|| format!("copying {}", src.display()))?;
            }
        }
        Ok(())
    }
}

/// Every gradient copied to the host (`None` stays `None`).
pub fn host_grads<B: Backend>(
    be: &B,
    grads: Vec<Option<crate::tensor::Tensor<B>>>,
) -> anyhow::Result<Vec<Option<Vec<f32>>>> {
    Ok(grads
        .into_iter()
        .map(|g| g.map(|g| be.to_vec_f32(&g)).transpose())
        .collect::<Result<_, _>>()?)
}

/// The global L2 norm of all gradients (f64 accumulation, as `clip_grad_norm_` in f32 would
/// be less exact).
pub fn global_norm(grads: &[Option<Vec<f32>>]) -> f64 {
    grads
        .iter()
        .flatten()
        .flat_map(|g| g.iter())
        .map(|&x| x as f64 * x as f64)
        .sum::<f64>()
        .sqrt()
}

/// Clips by `norm` to `o.max_grad_norm` and takes AdamW step `t` (1-based) at rate `lr` on
/// every master that has a gradient; a weight the loss does not reach gets no update, as
/// PyTorch skips parameters whose `grad` is `None`.
pub fn adamw_update(
    masters: &mut [Master],
    moments: &mut [Moments],
    grads: Vec<Option<Vec<f32>>>,
    t: u64,
    lr: f32,
    norm: f64,
    o: &TrainOptions,
) {
    let clip = if o.max_grad_norm > 0.0 {
        clip_factor(norm, o.max_grad_norm)
    } else {
        1.0
    };
    let h = o.adamw;
    masters
        .par_iter_mut()
        .zip(moments.par_iter_mut())
        .zip(grads.into_par_iter())
        .for_each(|((m, mo), g)| {
            if let Some(mut g) = g {
                if clip != 1.0 {
                    g.iter_mut().for_each(|x| *x *= clip);
                }
                adamw_step(&mut m.data, &g, mo, t, lr, decays(&m.name), &h);
            }
        });
}

/// The per-device batch size of `bucket` for dataset `d`: the dataset's own (first
/// record's `batch_size`) or the option's, scaled down for longer buckets.
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
        .map(|(i, r)| r.with_context(|| format!("{}: record {}", d.path.display(), i + 1)))
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
    std::fs::create_dir_all(&opts.output_dir)?;
    let save_steps = opts.save_steps;
    let mut trainer = Trainer::new(be, opts, dtype, resume)?;
    let mut metrics = metrics
        .map(|p| MetricsWriter::open(p, resume))
        .transpose()?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(trainer.total_steps())
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_position(trainer.state().step);
    while !trainer.finished() {
        let r = trainer.step()?;
        bar.set_position(r.step);
        bar.set_message(format!(
            "loss {:.4} · {:.0} tok/s",
            r.loss.loss,
            r.tokens as f64 / r.seconds.max(1e-9)
        ));
        if let Some(m) = &mut metrics {
            m.write(&r.to_json())?;
        }
        if save_steps.is_some_and(|n| n > 0 && r.step % n == 0) {
            let dir = trainer.save_checkpoint()?;
            bar.println(format!("wrote {}", dir.display()));
        }
    }
    trainer.save_final()?;
    bar.finish();
    Ok(())
}

/// Appends one JSON object per line to a metrics file.
pub struct MetricsWriter(std::io::BufWriter<std::fs::File>);

impl MetricsWriter {
    /// Opens (appending when resuming, else truncating) a metrics file.
    pub fn open(path: &Path, append: bool) -> anyhow::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        Ok(MetricsWriter(std::io::BufWriter::new(f)))
    }

    /// Writes one line and flushes it, so a crash keeps every finished step.
    pub fn write(&mut self, v: &serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.0, "{v}")?;
        self.0.flush()?;
        Ok(())
    }
}
