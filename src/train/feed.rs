//! The feed: training data validated, tokenized once and bucketed up front, and for each
//! step the batch of the seeded plan (SPEC §6) sampled and packed from those tokens, with the loss settings that go
//! with it (teacher scores, stand-in columns, in-batch negatives or not).

use anyhow::{bail, Context};
use rayon::prelude::*;

use super::data::{global_queries, load_all, make_batch, plan_epoch, BatchPlan, Dataset, Text};
use super::forward::StepBatch;
use super::loss::LossConfig;
use super::options::{TrainOptions, BUCKET_BATCH};
use crate::batch::pack_ids_in_order;
use crate::model::config::Config;
use crate::text::TextTokenizer;

/// Datasets, their lengths, and the current epoch's plan, for one rank of `world`.
pub struct Feed {
    rank: usize,
    world: usize,
    datasets: Vec<Dataset>,
    tokens: Vec<Tokens>,
    max_lens: Vec<Vec<usize>>,
    plan: Vec<BatchPlan>,
    plan_epoch: u64,
    excluded: Vec<u32>,
}

impl Feed {
    /// Loads and validates `opts.data`, tokenizes every text once (as training truncates
    /// it; the lengths fill the buckets) and plans `epoch` (global batches of `world` ranks' batches; this rank takes slice
    /// `rank`); what the user should know goes to `warnings`.
    pub fn new(
        opts: &TrainOptions,
        tokenizer: TextTokenizer,
        max_tokens: usize,
        epoch: u64,
        (rank, world): (usize, usize),
        warnings: &mut Vec<String>,
    ) -> anyhow::Result<Self> {
        let datasets = load_all(&opts.data)?;
        check_group_size(&datasets, opts.group, warnings)?;
        let tokens = datasets
            .iter()
            .map(|d| Tokens::of(&tokenizer, d, opts, max_tokens))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let max_lens = datasets
            .iter()
            .zip(&tokens)
            .map(|(d, t)| t.max_lens(d))
            .collect();
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
            datasets,
            tokens,
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
        let tokens = &self.tokens[plan.dataset];
        let ids = |picks: &[(usize, Text)]| -> Vec<&[u32]> {
            picks.iter().map(|&(i, t)| tokens.ids(ds, i, t)).collect()
        };
        let batch = StepBatch {
            q: pack_ids_in_order(&ids(&tb.queries), offset),
            p: pack_ids_in_order(&ids(&tb.passages), offset),
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

/// Every text of one dataset tokenized once, truncated as training truncates it (queries
/// to `query_max_len`, passages to `passage_max_len`, both within the model's maximum),
/// the ids of all texts in one flat array.
struct Tokens {
    ids: Vec<u32>,
    /// Text `k`'s ids are `ids[start[k]..start[k + 1]]`.
    start: Vec<usize>,
    /// Record `i`'s texts ([`super::data::Record::texts`] order) begin at text `first[i]`.
    first: Vec<usize>,
}

impl Tokens {
    /// Tokenizes `d`; a text the tokenizer rejects is an error naming file and record.
    fn of(
        tok: &TextTokenizer,
        d: &Dataset,
        o: &TrainOptions,
        max_tokens: usize,
    ) -> anyhow::Result<Self> {
        let (q_max, p_max) = (
            o.query_max_len.min(max_tokens),
            o.passage_max_len.min(max_tokens),
        );
        let per_record: Vec<Vec<Vec<u32>>> = d
            .records
            .par_iter()
            .map(|r| {
                r.texts()
                    .enumerate()
                    .map(|(k, t)| {
                        let max = if k == 0 { q_max } else { p_max };
                        Ok(tok.encode(t, max, false)?.ids)
                    })
                    .collect::<anyhow::Result<Vec<Vec<u32>>>>()
            })
            .collect::<Vec<anyhow::Result<_>>>()
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.with_context(|| d.source(i)))
            .collect::<anyhow::Result<_>>()?;
        let total = per_record.iter().flatten().map(Vec::len).sum();
        let mut t = Tokens {
            ids: Vec::with_capacity(total),
            start: vec![0],
            first: Vec::with_capacity(per_record.len()),
        };
        for texts in per_record {
            t.first.push(t.start.len() - 1);
            for ids in texts {
                t.ids.extend_from_slice(&ids);
                t.start.push(t.ids.len());
            }
        }
        Ok(t)
    }

    /// The ids of text `t` of record `i` of `d`.
    fn ids(&self, d: &Dataset, i: usize, t: Text) -> &[u32] {
        let k = self.first[i] + d.records[i].text_index(t);
        &self.ids[self.start[k]..self.start[k + 1]]
    }

    /// Each record's longest text in tokens (for the length buckets).
    fn max_lens(&self, d: &Dataset) -> Vec<usize> {
        (0..d.records.len())
            .map(|i| {
                let n = d.records[i].texts().count();
                (self.first[i]..self.first[i] + n)
                    .map(|k| self.start[k + 1] - self.start[k])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::pack_in_order;
    use std::path::PathBuf;

    #[test]
    fn batches_hold_what_a_fresh_tokenization_of_their_texts_would() {
        let dir = std::env::temp_dir().join(format!("m3-feed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let long = "a rather long text that the truncation has to cut short somewhere";
        let mut lines = String::new();
        for i in 0..7 {
            let rec = serde_json::json!({
                "query": format!("query {i} {}", if i % 2 == 0 { long } else { "" }),
                "pos": [format!("positive {i}"), format!("other positive {i} {long}")],
                "neg": (0..i % 4).map(|n| format!("negative {n} of {i}")).collect::<Vec<_>>(),
            });
            lines += &format!("{rec}\n");
        }
        let data = dir.join("data.jsonl");
        std::fs::write(&data, lines).unwrap();
        let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-m3");
        let tok = TextTokenizer::from_dir(&model).unwrap();
        let config = Config::from_file(&model.join("config.json")).unwrap();
        let mut o = TrainOptions::new(model, vec![data], dir.join("out"));
        o.batch_size = 2;
        o.group = 3;
        o.query_max_len = 6;
        o.passage_max_len = 9;
        let mut feed = Feed::new(
            &o,
            tok.clone(),
            config.max_tokens(),
            0,
            (0, 1),
            &mut Vec::new(),
        )
        .unwrap();
        let enc = |texts: Vec<&str>, max: usize| -> Vec<crate::text::Encoded> {
            texts
                .iter()
                .map(|t| tok.encode(t, max, false).unwrap())
                .collect()
        };
        let off = config.position_offset();
        let mut cut = 0;
        for index in 0..feed.epoch_len(&o) {
            let (b, _, _) = feed.batch(&o, &config, 0, index, index as u64).unwrap();
            let plan = &feed.plan[index];
            let ds = &feed.datasets[plan.dataset];
            let tb = make_batch(ds, plan, 0, 1, o.group, o.seed, 0, index as u64, o.shuffle);
            let (q, p) = (enc(tb.query_texts(ds), 6), enc(tb.passage_texts(ds), 9));
            cut += q.iter().chain(&p).filter(|e| e.truncated).count();
            assert_eq!(b.q, pack_in_order(&q, off), "queries of batch {index}");
            assert_eq!(b.p, pack_in_order(&p, off), "passages of batch {index}");
        }
        assert!(cut > 0, "no text was long enough to be truncated");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
