//! Training data as FlagEmbedding reads it (JSONL `{"query", "pos": [..], "neg": [..],
//! "pos_scores"?, "neg_scores"?}`), validated whole before the first step, and the batch
//! plan of SPEC §6: length buckets, one dataset and one bucket per batch, a shuffle from
//! the seed that every rank repeats, one positive at random and G-1 negatives per query.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::rng::Rng;

/// One training example.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The query.
    pub query: String,
    /// Relevant passages (at least one).
    pub pos: Vec<String>,
    /// Negative passages (may be empty: sampled with replacement, or none for G = 1).
    #[serde(default)]
    pub neg: Vec<String>,
    /// Teacher scores of the positives (knowledge distillation).
    #[serde(default)]
    pub pos_scores: Option<Vec<f32>>,
    /// Teacher scores of the negatives.
    #[serde(default)]
    pub neg_scores: Option<Vec<f32>>,
    /// FlagEmbedding's per-file batch size (read from a file's first record).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// FlagEmbedding's data type tag (accepted, unused).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Prompt fields some FlagEmbedding datasets carry (accepted, unused).
    #[serde(default)]
    pub prompt: Option<String>,
}

/// One dataset: one file; a batch never mixes datasets.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file.
    pub path: PathBuf,
    /// Its records, in file order.
    pub records: Vec<Record>,
    /// Score each query only against its own group (FlagEmbedding marks such data with a
    /// directory name ending in `no_in_batch_neg`).
    pub no_in_batch_neg: bool,
    /// Batch size from the file's first record, if it names one.
    pub batch_size: Option<usize>,
    /// The 1-based line of each record, for messages.
    pub lines: Vec<usize>,
}

impl Dataset {
    /// `file:line` of record `i`.
    pub fn source(&self, i: usize) -> String {
        format!("{}:{}", self.path.display(), self.lines[i])
    }
}

fn validate(r: &Record, src: &str) -> anyhow::Result<()> {
    if r.pos.is_empty() {
        bail!("{src}: record has no positive passage (\"pos\" is empty)");
    }
    if let Some(s) = &r.pos_scores {
        if s.len() != r.pos.len() {
            bail!(
                "{src}: {} pos_scores for {} positives",
                s.len(),
                r.pos.len()
            );
        }
    }
    if let Some(s) = &r.neg_scores {
        if s.len() != r.neg.len() {
            bail!(
                "{src}: {} neg_scores for {} negatives",
                s.len(),
                r.neg.len()
            );
        }
    }
    if r.pos_scores.is_some() != r.neg_scores.is_some() && !r.neg.is_empty() {
        bail!("{src}: pos_scores and neg_scores must come together");
    }
    if let Some(s) = r
        .pos_scores
        .iter()
        .chain(&r.neg_scores)
        .flatten()
        .find(|s| !s.is_finite())
    {
        bail!("{src}: teacher score {s} is not finite");
    }
    Ok(())
}

/// Reads one JSONL file, every line validated; an error names the file and line.
pub fn load_file(path: &Path, no_in_batch_neg: bool) -> anyhow::Result<Dataset> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut records = Vec::new();
    let mut lines = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let src = format!("{}:{}", path.display(), i + 1);
        if line.len() > crate::text::MAX_LINE_BYTES {
            bail!(
                "{src}: line longer than {} MiB, the limit for one record",
                crate::text::MAX_LINE_BYTES >> 20
            );
        }
        let text =
            std::str::from_utf8(line).map_err(|e| anyhow::anyhow!("{src}: invalid UTF-8 ({e})"))?;
        if text.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("{src}: bad training record: {e}"))?;
        validate(&r, &src)?;
        records.push(r);
        lines.push(i + 1);
    }
    if records.is_empty() {
        bail!("{}: no training records", path.display());
    }
    let batch_size = records[0].batch_size;
    Ok(Dataset {
        path: path.to_path_buf(),
        records,
        no_in_batch_neg,
        batch_size,
        lines,
    })
}

/// Whether a file or directory name marks data scored only within each query's group
/// (FlagEmbedding: the name ends in `no_in_batch_neg`, before any extension).
fn marks_no_in_batch_neg(p: &Path) -> bool {
    p.file_stem()
        .is_some_and(|n| n.to_string_lossy().ends_with("no_in_batch_neg"))
}

/// Reads every path of `paths` with [`load`], in order.
pub fn load_all(paths: &[PathBuf]) -> anyhow::Result<Vec<Dataset>> {
    let mut all = Vec::new();
    for p in paths {
        all.extend(load(p)?);
    }
    if all.is_empty() {
        bail!("no training data given");
    }
    Ok(all)
}

/// Reads `path`: one JSONL file, or a directory whose `.json`/`.jsonl` files are one dataset
/// each (sorted by name). A name ending in `no_in_batch_neg` (the directory's, or a file's
/// before its extension) marks the data so.
pub fn load(path: &Path) -> anyhow::Result<Vec<Dataset>> {
    if path.is_file() {
        return Ok(vec![load_file(path, marks_no_in_batch_neg(path))?]);
    }
    if !path.is_dir() {
        bail!(
            "{}: no such training data file or directory",
            path.display()
        );
    }
    let no_ibn = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with("no_in_batch_neg"));
    let subdirs = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list", path.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .count();
    if subdirs > 0 {
        bail!(
            "{}: has {subdirs} subdirectories, which are not read; pass each data directory to --data",
            path.display()
        );
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list", path.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "jsonl" || e == "json"));
    files.sort();
    if files.is_empty() {
        bail!("{}: no .jsonl or .json files", path.display());
    }
    files
        .iter()
        .map(|f| load_file(f, no_ibn || marks_no_in_batch_neg(f)))
        .collect()
}

/// Upper edges of the length buckets (SPEC §6): [0,500), [500,1000), [1000,2000), then
/// 1000 wide up to [7000, ∞).
pub const BUCKET_EDGES: [usize; 8] = [500, 1000, 2000, 3000, 4000, 5000, 6000, 7000];

/// The bucket of an example whose longest text has `max_len` tokens.
pub fn bucket_of(max_len: usize) -> usize {
    BUCKET_EDGES
        .iter()
        .position(|&e| max_len < e)
        .unwrap_or(BUCKET_EDGES.len())
}

/// One global batch (all ranks together): records of one dataset and one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPlan {
    /// Dataset index.
    pub dataset: usize,
    /// Length bucket.
    pub bucket: usize,
    /// Record indices within the dataset.
    pub records: Vec<usize>,
}

/// A generator for `(seed, a, b)`, identical on every rank.
fn rng_for(seed: u64, a: u64, b: u64) -> Rng {
    let mut r = Rng::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mix = r.next_u64() ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    Rng::new(mix)
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u32 + 1) as usize;
        v.swap(i, j);
    }
}

/// The batches of one epoch. `max_lens[d][i]` is the longest text (in tokens) of record `i`
/// of dataset `d`; `batch_size(bucket, dataset)` the per-device batch size, times `world`
/// for a global batch. With `shuffle`, records are shuffled within each (dataset, bucket)
/// and the batches shuffled globally, all from `seed` and `epoch`, so every rank plans the
/// same epoch; without it, batches keep file order. A bucket's last batch may be short:
/// no example is dropped.
pub fn plan_epoch(
    max_lens: &[Vec<usize>],
    batch_size: &dyn Fn(usize, usize) -> usize,
    world: usize,
    seed: u64,
    epoch: u64,
    shuffle_data: bool,
) -> Vec<BatchPlan> {
    let mut plans = Vec::new();
    let mut rng = rng_for(seed, epoch, u64::MAX);
    for (d, lens) in max_lens.iter().enumerate() {
        let mut by_bucket: Vec<Vec<usize>> = vec![Vec::new(); BUCKET_EDGES.len() + 1];
        for (i, &l) in lens.iter().enumerate() {
            by_bucket[bucket_of(l)].push(i);
        }
        for (b, mut idx) in by_bucket.into_iter().enumerate() {
            if shuffle_data {
                shuffle(&mut idx, &mut rng);
            }
            let size = (batch_size(b, d) * world.max(1)).max(1);
            for chunk in idx.chunks(size) {
                plans.push(BatchPlan {
                    dataset: d,
                    bucket: b,
                    records: chunk.to_vec(),
                });
            }
        }
    }
    if shuffle_data {
        shuffle(&mut plans, &mut rng);
    } else {
        plans.sort_by_key(|p| (p.dataset, p.records[0]));
    }
    plans
}

/// One text of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    /// The query.
    Query,
    /// Positive `p`.
    Pos(usize),
    /// Negative `n`.
    Neg(usize),
}

impl Record {
    /// Its texts in a fixed order: the query, the positives, the negatives.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.query.as_str())
            .chain(self.pos.iter().map(String::as_str))
            .chain(self.neg.iter().map(String::as_str))
    }

    /// Where `t` comes in [`Record::texts`].
    pub fn text_index(&self, t: Text) -> usize {
        match t {
            Text::Query => 0,
            Text::Pos(p) => 1 + p,
            Text::Neg(n) => 1 + self.pos.len() + n,
        }
    }

    /// Text `t`.
    pub fn text(&self, t: Text) -> &str {
        match t {
            Text::Query => &self.query,
            Text::Pos(p) => &self.pos[p],
            Text::Neg(n) => &self.neg[n],
        }
    }
}

/// One rank's training batch: B queries and B·G passages (each query's positive first),
/// as `(record, text)` picks from one dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBatch {
    /// Queries.
    pub queries: Vec<(usize, Text)>,
    /// Passages, G per query: positive, then G-1 negatives.
    pub passages: Vec<(usize, Text)>,
    /// Teacher scores per passage when the data has them.
    pub teacher: Option<Vec<f32>>,
    /// Per passage: a stand-in filling the group of a record with too few negatives (no
    /// negatives at all); the loss masks these columns out.
    pub filler: Vec<bool>,
    /// Group size G.
    pub group: usize,
    /// Whether queries are scored only against their own group.
    pub no_in_batch_neg: bool,
}

impl TrainBatch {
    /// The queries' texts in `ds`, the dataset the batch was drawn from.
    pub fn query_texts<'d>(&self, ds: &'d Dataset) -> Vec<&'d str> {
        self.queries
            .iter()
            .map(|&(i, t)| ds.records[i].text(t))
            .collect()
    }

    /// The passages' texts in `ds`.
    pub fn passage_texts<'d>(&self, ds: &'d Dataset) -> Vec<&'d str> {
        self.passages
            .iter()
            .map(|&(i, t)| ds.records[i].text(t))
            .collect()
    }
}

/// Rank `rank`'s contiguous share of a global batch of `records`: `⌈n / world⌉` each, the
/// last ranks what is left. A rank left with nothing (a short last batch) takes record
/// `rank mod n` again, as PyTorch's `DistributedSampler` pads, so no rank is idle.
pub fn rank_slice(records: &[usize], rank: usize, world: usize) -> &[usize] {
    let n = records.len();
    let per = n.div_ceil(world.max(1));
    let (a, b) = ((rank * per).min(n), ((rank + 1) * per).min(n));
    if a < b || n == 0 {
        &records[a..b]
    } else {
        std::slice::from_ref(&records[rank % n])
    }
}

/// Queries of all ranks together in a global batch of `n` records split over `world`
/// ranks (the padding of [`rank_slice`] included).
pub fn global_queries(n: usize, world: usize) -> usize {
    let ids: Vec<usize> = (0..n).collect();
    (0..world.max(1))
        .map(|r| rank_slice(&ids, r, world).len())
        .sum()
}

/// Builds rank `rank`'s share of global batch `plan` (step `step` of `epoch`): one positive
/// at random and G-1 negatives (sampled without replacement, or with it when there are too
/// few), as FlagEmbedding does. Without `shuffle`: the first positive and the negatives in
/// file order (cycled when too few).
#[allow(clippy::too_many_arguments)]
pub fn make_batch(
    ds: &Dataset,
    plan: &BatchPlan,
    rank: usize,
    world: usize,
    group: usize,
    seed: u64,
    epoch: u64,
    step: u64,
    shuffle_data: bool,
) -> TrainBatch {
    let world = world.max(1);
    let mine = rank_slice(&plan.records, rank, world);
    let mut rng = rng_for(seed, epoch, step.wrapping_mul(1 << 16) + rank as u64);
    let with_teacher = mine.iter().all(|&i| ds.records[i].pos_scores.is_some());
    let mut batch = TrainBatch {
        queries: Vec::new(),
        passages: Vec::new(),
        teacher: with_teacher.then(Vec::new),
        filler: Vec::new(),
        group,
        no_in_batch_neg: ds.no_in_batch_neg,
    };
    for &i in mine {
        let r = &ds.records[i];
        batch.queries.push((i, Text::Query));
        let p = if shuffle_data {
            rng.below(r.pos.len() as u32) as usize
        } else {
            0
        };
        let want = group.saturating_sub(1);
        let negs: Vec<usize> = if want == 0 || r.neg.is_empty() {
            Vec::new()
        } else if !shuffle_data {
            (0..want).map(|k| k % r.neg.len()).collect()
        } else if r.neg.len() >= want {
            let mut all: Vec<usize> = (0..r.neg.len()).collect();
            shuffle(&mut all, &mut rng);
            all.truncate(want);
            all
        } else {
            // Too few: repeat the list until it covers G-1, then sample from the repeats.
            let mut all: Vec<usize> = (0..want.div_ceil(r.neg.len()) * r.neg.len())
                .map(|k| k % r.neg.len())
                .collect();
            shuffle(&mut all, &mut rng);
            all.truncate(want);
            all
        };
        batch.passages.push((i, Text::Pos(p)));
        batch.filler.push(false);
        if let (Some(t), Some(ps)) = (&mut batch.teacher, &r.pos_scores) {
            t.push(ps[p]);
        }
        for &n in &negs {
            batch.passages.push((i, Text::Neg(n)));
            batch.filler.push(false);
            if let (Some(t), Some(ns)) = (&mut batch.teacher, &r.neg_scores) {
                t.push(ns[n]);
            }
        }
        // A record without negatives fills its group with stand-ins (its positive), so every
        // group has G passages; the loss masks them, so the record is trained against the
        // in-batch negatives only (FlagEmbedding divides by zero here).
        for _ in negs.len()..want {
            batch.passages.push((i, Text::Pos(p)));
            batch.filler.push(true);
            if let (Some(t), Some(ps)) = (&mut batch.teacher, &r.pos_scores) {
                t.push(ps[p]);
            }
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("m3-data-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn bad_lines_are_errors_naming_file_and_line() {
        let d = tmp("bad");
        let p = write(
            &d,
            "a.jsonl",
            "{\"query\": \"q\", \"pos\": [\"p\"]}\n\n{\"query\": \"q\", \"pos\": []}\n",
        );
        let e = load_file(&p, false).unwrap_err().to_string();
        assert!(e.contains("a.jsonl:3") && e.contains("no positive"), "{e}");
        let p = write(
            &d,
            "b.jsonl",
            "{\"query\": \"q\", \"pos\": [\"p\"]}\n{\"query\": 1}\n",
        );
        let e = load_file(&p, false).unwrap_err().to_string();
        assert!(e.contains("b.jsonl:2"), "{e}");
        let p = write(&d, "c.jsonl", "{\"query\": \"q\", \"pos\": [\"p\"], \"neg\": [\"n\"], \"pos_scores\": [1.0], \"neg_scores\": []}\n");
        let e = load_file(&p, false).unwrap_err().to_string();
        assert!(e.contains("c.jsonl:1") && e.contains("neg_scores"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_mark_no_in_batch_negative_data_and_subdirectories_are_refused() {
        let d = tmp("names");
        let rec = "{\"query\": \"q\", \"pos\": [\"p\"]}\n";
        write(&d, "a.jsonl", rec);
        let marked = write(&d, "b-no_in_batch_neg.jsonl", rec);
        let all = load(&d).unwrap();
        assert_eq!(
            all.iter().map(|x| x.no_in_batch_neg).collect::<Vec<_>>(),
            vec![false, true]
        );
        assert!(load_all(&[marked]).unwrap()[0].no_in_batch_neg);
        let sub = d.join("retrieval-no_in_batch_neg");
        write(&sub, "c.jsonl", rec);
        assert!(load(&sub).unwrap()[0].no_in_batch_neg);
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("subdirectories"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn buckets_follow_the_spec() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(499), 0);
        assert_eq!(bucket_of(500), 1);
        assert_eq!(bucket_of(1999), 2);
        assert_eq!(bucket_of(2000), 3);
        assert_eq!(bucket_of(6999), 7);
        assert_eq!(bucket_of(9000), 8);
    }

    #[test]
    fn plans_cover_every_record_once_without_mixing_datasets_or_buckets() {
        let lens = vec![vec![10, 600, 20, 30, 700, 40, 2500], vec![5; 9]];
        for shuffle_data in [true, false] {
            let plans = plan_epoch(&lens, &|_, _| 2, 1, 42, 0, shuffle_data);
            let mut seen: Vec<(usize, usize)> = plans
                .iter()
                .flat_map(|p| p.records.iter().map(move |&r| (p.dataset, r)))
                .collect();
            seen.sort();
            let want: Vec<(usize, usize)> = lens
                .iter()
                .enumerate()
                .flat_map(|(d, l)| (0..l.len()).map(move |r| (d, r)))
                .collect();
            assert_eq!(seen, want);
            for p in &plans {
                assert!(p.records.len() <= 2);
                assert!(p
                    .records
                    .iter()
                    .all(|&r| bucket_of(lens[p.dataset][r]) == p.bucket));
            }
        }
        // The same seed and epoch plan the same epoch (every rank); another epoch differs.
        assert_eq!(
            plan_epoch(&lens, &|_, _| 2, 2, 42, 3, true),
            plan_epoch(&lens, &|_, _| 2, 2, 42, 3, true)
        );
        assert_ne!(
            plan_epoch(&lens, &|_, _| 1, 1, 42, 3, true),
            plan_epoch(&lens, &|_, _| 1, 1, 42, 4, true)
        );
        // Without shuffling, file order.
        let plain = plan_epoch(&[vec![1; 5]], &|_, _| 2, 1, 0, 0, false);
        assert_eq!(
            plain.iter().map(|p| p.records.clone()).collect::<Vec<_>>(),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
    }

    #[test]
    fn groups_have_a_positive_first_and_g_minus_one_negatives() {
        let rec = |n: usize| Record {
            query: format!("q{n}"),
            pos: vec![format!("p{n}a"), format!("p{n}b")],
            neg: (0..n).map(|k| format!("n{n}-{k}")).collect(),
            pos_scores: Some(vec![9.0, 8.0]),
            neg_scores: Some((0..n).map(|k| k as f32).collect()),
            batch_size: None,
            kind: None,
            prompt: None,
        };
        let ds = Dataset {
            path: "x".into(),
            records: vec![rec(10), rec(2), rec(0)],
            no_in_batch_neg: false,
            batch_size: None,
            lines: vec![1, 2, 3],
        };
        let plan = BatchPlan {
            dataset: 0,
            bucket: 0,
            records: vec![0, 1, 2],
        };
        let b = make_batch(&ds, &plan, 0, 1, 4, 7, 0, 0, true);
        assert_eq!(b.query_texts(&ds), vec!["q10", "q2", "q0"]);
        let passages = b.passage_texts(&ds);
        assert_eq!(passages.len(), 12);
        for (g, chunk) in passages.chunks(4).enumerate() {
            let n = [10, 2, 0][g];
            assert!(chunk[0].starts_with(&format!("p{n}")));
            if n > 0 {
                assert!(
                    chunk[1..].iter().all(|p| p.starts_with(&format!("n{n}-"))),
                    "{chunk:?}"
                );
            }
        }
        // Enough negatives: sampled without replacement.
        let mut first: Vec<&str> = passages[1..4].to_vec();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 3);
        let t = b.teacher.unwrap();
        assert_eq!(t.len(), 12);
        assert!(t[0] == 9.0 || t[0] == 8.0);
        // Deterministic from (seed, epoch, step, rank); split across ranks.
        assert_eq!(
            make_batch(&ds, &plan, 0, 1, 4, 7, 0, 0, true),
            make_batch(&ds, &plan, 0, 1, 4, 7, 0, 0, true)
        );
        let r1 = make_batch(&ds, &plan, 1, 2, 4, 7, 0, 0, true);
        assert_eq!(r1.query_texts(&ds), vec!["q0"]);
        // No shuffle: first positive, negatives in file order.
        let b = make_batch(&ds, &plan, 0, 1, 3, 7, 0, 0, false);
        let passages = b.passage_texts(&ds);
        assert_eq!(&passages[..3], &["p10a", "n10-0", "n10-1"]);
        assert_eq!(&passages[3..6], &["p2a", "n2-0", "n2-1"]);
    }

    #[test]
    fn every_rank_gets_records_even_from_a_short_batch() {
        let r: Vec<usize> = (10..15).collect();
        let shares: Vec<&[usize]> = (0..4).map(|k| rank_slice(&r, k, 4)).collect();
        assert_eq!(shares, vec![&[10, 11][..], &[12, 13], &[14], &[13]]);
        assert_eq!(global_queries(5, 4), 6);
        assert_eq!(rank_slice(&[7], 1, 2), &[7]);
        assert_eq!(global_queries(1, 2), 2);
        assert_eq!(global_queries(6, 1), 6);
        // With enough records the ranks' slices are the global batch, in order, once.
        let r: Vec<usize> = (0..7).collect();
        for world in [1, 2, 3, 7] {
            let all: Vec<usize> = (0..world)
                .flat_map(|k| rank_slice(&r, k, world).to_vec())
                .collect();
            assert_eq!(all, r, "world {world}");
        }
    }
}
