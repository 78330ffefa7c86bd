//! A small training batch with every loss term, and the host syncs one training step makes
//! with it on any backend (the CPU in tests/train.rs, a GPU in tests/cuda_ops.rs).

use std::path::Path;

use m3::backend::cpu::Cpu;
use m3::backend::{host_syncs, Backend};
use m3::batch::pack_in_order;
use m3::model::embedder::{Embedder, EncodeOptions};
use m3::train::forward::{RankLoss, StepBatch, StepDropout};
use m3::train::loss::{KdLoss, LossConfig};
use m3::train::model::TrainModel;
use m3::train::optim::AdamW;
use m3::train::optimizer::Optimizer;
use m3::train::step::{train_step, StepInput};
use m3::DType;

/// Three queries with two passages each, tokenized by the model in `fixture`, and a loss
/// with every term: unified, self-distillation and teacher scores.
pub fn small_batch(fixture: &Path) -> (StepBatch, LossConfig) {
    let m = Embedder::load(&Cpu, fixture, DType::F32).unwrap();
    let enc = |t: &str| m.tokenize(t, &EncodeOptions::default()).unwrap();
    let off = m.config.position_offset();
    let batch = StepBatch {
        q: pack_in_order(
            &[
                enc("What is the capital of France?"),
                enc("Der schnelle braune Fuchs"),
                enc("狐狸"),
            ],
            off,
        ),
        p: pack_in_order(
            &[
                "Paris is the capital of France.",
                "Быстрая коричневая лиса прыгает",
                "The quick brown fox jumps over the lazy dog.",
                "敏捷的棕色狐狸跳过了懒狗。",
                "Mount Everest is 8849 metres high.",
                "Es ist halb drei am Nachmittag.",
            ]
            .map(enc),
            off,
        ),
    };
    let s = m.tokenizer.specials;
    let mut cfg = LossConfig::new(2, vec![s.cls, s.eos, s.pad.unwrap(), s.unk.unwrap()]);
    cfg.temperature = 0.05;
    cfg.teacher = Some((vec![1.0, 0.2, 0.5, 0.4, 2.0, -1.0], KdLoss::KlDiv));
    (batch, cfg)
}

/// Host syncs of one training step, and the bound they should keep.
#[derive(Debug)]
pub struct SyncCount {
    /// The step's sub-batch size.
    pub sub_batch: Option<usize>,
    /// Host syncs the second step made (the first also builds the optimiser's state).
    pub syncs: u64,
    /// The loss parts read once, the gradient norm, the self-distillation teacher; with
    /// sub-batches also pass one's host copies of each sub-batch's dense, sparse and
    /// colbert outputs (kept on the host so device memory holds one sub-batch at a time).
    pub bound: u64,
}

impl SyncCount {
    /// Fails naming the run (`what`) when the step made more host syncs than the bound.
    pub fn assert_bounded(&self, what: &str) {
        assert!(
            self.syncs <= self.bound,
            "{what}, sub-batch {:?}: {} host syncs per step, bound {}",
            self.sub_batch,
            self.syncs,
            self.bound
        );
    }
}

/// Two steps of [`small_batch`] on `be` (compute `dtype`), whole and in sub-batches of 2.
pub fn step_host_syncs<B: Backend>(be: &B, fixture: &Path, dtype: DType) -> Vec<SyncCount> {
    let mut model = TrainModel::load(be, fixture, DType::F32, 0).unwrap();
    let mut opt = Optimizer::new(be, &mut model, dtype, AdamW::default(), 1.0, None).unwrap();
    let (batch, cfg) = small_batch(fixture);
    let mut out = Vec::new();
    for sub in [None, Some(2)] {
        let mut syncs = 0;
        for t in 1..=2 {
            let input = StepInput {
                batch: &batch,
                loss: &cfg,
                dropout: StepDropout { p: 0.1, seed: t },
                sub_batch: sub,
                t,
                lr: 1e-5,
            };
            let before = host_syncs();
            train_step(be, &mut model, &mut opt, &input, &RankLoss::solo()).unwrap();
            syncs = host_syncs() - before;
        }
        let pieces = sub.map_or(0, |n| batch.q.len().div_ceil(n) + batch.p.len().div_ceil(n));
        out.push(SyncCount {
            sub_batch: sub,
            syncs,
            bound: 3 + 3 * pieces as u64,
        });
    }
    out
}
