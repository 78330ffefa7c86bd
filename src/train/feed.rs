//! The feed: training data validated and bucketed up front, and for each step the batch of
//! the seeded plan (SPEC §6) sampled, tokenized and packed, with the loss settings that go
//! with it (teacher scores, stand-in columns, in-batch negatives or not).

use anyhow::{bail, Context};
use rayon::prelude::*;

use super::data::{global_queries, load_all, make_batch, plan_epoch, BatchPlan, Dataset};
use super::forward::StepBatch;
use super::loss::LossConfig;
use super::options::{TrainOptions, BUCKET_BATCH};
use crate::batch::pack_in_order;
use crate::model::config::Config;
use crate::text::{Encoded, TextTokenizer};

/// Datasets, their lengths, and the current epoch's plan, for one rank of `world`.
pub struct Feed {
    rank: usize,
    world: usize,
    tokenizer: TextTokenizer,
    datasets: Vec<Dataset>,
    max_lens: Vec<Vec<usize>>,
    plan: Vec<BatchPlan>,
    plan_epoch: u64,
    excluded: Vec<u32>,
}

impl Feed {
    /// Loads and validates `opts.data`, measures every record's length for the buckets and
    /// plans `epoch` (global batches of `world` ranks' batches; this rank takes slice
    /// `rank`); what the user should know goes to `warnings`.
    pub fn new(
        opts: &TrainOptions,
        tokenizer: TextTokenizer,
        epoch: u64,
        (rank, world): (usize, usize),
        warnings: &mut Vec<String>,
    ) -> anyhow::Result<Self> {
        let datasets = load_all(&opts.data)?;
        check_group_size(&datasets, opts.group, warnings)?;
        let max_lens = datasets
            .iter()
            .map(|d| lengths(&tokenizer, d, opts))
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
            warnings.push(format!(
                "{ignored} record(s) carry \"type\" or \"prompt\" fields, which m3 ignores \
                 (no instruction prefixes, no symmetric or classification batching)"
            ));
        }
        let sp = tokenizer.specials;
        let excluded: Vec<u32> = [Some(sp.cls), Some(sp.eos), sp.pad, sp.unk]
            .into_iter()
            .flatten()
            .collect();
        let mut feed = Feed {
            rank,
            world: world.max(1),
            tokenizer,
            datasets,
            max_lens,
            plan: Vec::new(),
            plan_epoch: 0,
            excluded,
        };
        feed.plan = feed.plan_for(opts, epoch);
        feed.plan_epoch = epoch;
        Ok(feed)
    }

    fn plan_for(&self, opts: &TrainOptions, epoch: u64) -> Vec<BatchPlan> {
        plan_epoch(
            &self.max_lens,
            &batch_size_fn(opts, &self.datasets),
            self.world,
            opts.seed,
            epoch,
            opts.shuffle,
        )
    }

    /// Batches in one epoch (epoch 0's plan, which sizes the schedule).
    pub fn epoch_len(&self, opts: &TrainOptions) -> usize {
        if self.plan_epoch == 0 {
            self.plan.len()
        } else {
            self.plan_for(opts, 0).len()
        }
    }

    /// Whether batch `index` of `epoch` exists (else the epoch is over).
    pub fn has(&self, epoch: u64, index: usize) -> bool {
        epoch != self.plan_epoch || index < self.plan.len()
    }

    /// The token ids the lexical loss leaves out (CLS, EOS, PAD, UNK).
    pub fn excluded(&self) -> &[u32] {
        &self.excluded
    }

    /// This rank's share of batch `index` of `epoch` for optimiser step `step` (0-based):
    /// sampled from the plan, tokenized, packed, with its loss settings and the rank's
    /// weight in the global mean (`world · B_rank / B_global`, 1 on one rank).
    pub fn batch(
        &mut self,
        opts: &TrainOptions,
        config: &Config,
        epoch: u64,
        index: usize,
        step: u64,
    ) -> anyhow::Result<(StepBatch, LossConfig, f32)> {
        if epoch != self.plan_epoch {
            self.plan = self.plan_for(opts, epoch);
            self.plan_epoch = epoch;
        }
        let o = opts;
        let plan = &self.plan[index];
        let ds = &self.datasets[plan.dataset];
        let (rank, world) = (self.rank, self.world);
        let tb = make_batch(
            ds, plan, rank, world, o.group, o.seed, epoch, step, o.shuffle,
        );
        let weight =
            (world * tb.queries.len()) as f32 / global_queries(plan.records.len(), world) as f32;
        let offset = config.position_offset();
        let max_tokens = config.max_tokens();
        let enc = |texts: &[String], max: usize| -> anyhow::Result<Vec<Encoded>> {
            texts
                .iter()
                .map(|t| self.tokenizer.encode(t, max, false))
                .collect()
        };
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
            self_distill: !o.no_self_distill && (step as i64) > o.self_distill_start_step,
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
        Ok((batch, cfg, weight))
    }
}

/// Refuses a group size no record can fill (it would only repeat negatives, and memory
/// grows with it), and warns, once, how many records have too few negatives.
fn check_group_size(
    datasets: &[Dataset],
    group: usize,
    warnings: &mut Vec<String>,
) -> anyhow::Result<()> {
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
        warnings.push(format!(
            "{short} of {} record(s) have fewer than {want} negatives: their negatives are \
             repeated to fill the group of {group} (records with none train against \
             in-batch negatives only)",
            records.count()
        ));
    }
    Ok(())
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
