//! Everything `m3 train` takes ([`TrainOptions`], FlagEmbedding's flags as fields) and the
//! checks of the values a user can get wrong, each naming its flag.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::loss::KdLoss;
use super::optim::AdamW;

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
    /// With several ranks, score each query against every rank's passages in the dense
    /// loss (FlagEmbedding's `--negatives_cross_device`).
    pub negatives_cross_device: bool,
}

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
            negatives_cross_device: false,
        }
    }
}

/// Validates the options a user can get wrong, naming the flag.
pub fn validate(o: &TrainOptions) -> anyhow::Result<()> {
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
