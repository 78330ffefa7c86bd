//! `m3 bench memory`: how large a training batch fits the GPU at each passage length, with
//! and without sub-batches (the paper's Table 10 asks this of gradient checkpointing and
//! batch splitting). Peak device memory is measured for one training step (forward,
//! backward, the gradients) at batch 1 and batch 2 with the model, its f32 masters and the
//! AdamW moments resident; memory grows linearly in the batch, so
//! `max batch = (available - fixed) / per query`, with `fixed = peak(1) - per query` and
//! `per query = peak(2) - peak(1)`. Two steps per setting keep it within a short GPU
//! session; `--verify` also runs a step at the predicted size.

use super::out::outln;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use m3::backend::Backend;
use m3::batch::pack_in_order;
use m3::train::forward::{RankLoss, StepBatch, StepDropout};
use m3::train::loss::LossConfig;
use m3::train::model::TrainModel;
use m3::train::optim::AdamW;
use m3::train::optimizer::Optimizer;
use m3::train::step::{train_step, StepInput};
use m3::DType;
use serde_json::json;

use super::bench_inputs::train_inputs;
use super::device::Job;
use super::{ComputeArg, DeviceArg};

/// `m3 bench memory` flags.
#[derive(Args, Debug)]
pub struct MemoryBenchArgs {
    /// Model directory with heads, e.g. from `m3 bench make-model`.
    #[arg(long)]
    model: PathBuf,
    /// Passage lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,8192")]
    lengths: Vec<usize>,
    /// Query length in tokens (at most the passage length).
    #[arg(long, default_value_t = 64)]
    query_len: usize,
    /// Passages per query G.
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Sub-batch sizes to compare, in sequences; 0 means none (the whole batch at once).
    #[arg(long, value_delimiter = ',', default_value = "0,4")]
    sub_batch_sizes: Vec<usize>,
    /// Compute precision.
    #[arg(long, value_enum, default_value_t = ComputeArg::Bf16)]
    compute_dtype: ComputeArg,
    /// Also run one step at each predicted maximum up to 1024 (slow at long lengths).
    #[arg(long)]
    verify: bool,
    /// Where to run: peak memory is read from the CUDA memory pool, so cuda.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
    pub(super) device: DeviceArg,
}

impl Job for MemoryBenchArgs {
    fn run<B: Backend>(self, be: &B, device_dtype: DType) -> anyhow::Result<ExitCode> {
        let Some(_) = be.peak_memory()? else {
            bail!("m3 bench memory measures device memory: run it with --device cuda");
        };
        let dtype = self.compute_dtype.dtype(device_dtype)?;
        let mut model = TrainModel::load(be, &self.model, DType::F32, 1)?;
        // Resident as in training: masters (bf16 compute) and both AdamW moments.
        let adamw = AdamW::default();
        let opt = std::cell::RefCell::new(Optimizer::new(be, &mut model, dtype, adamw, 1.0, None)?);
        let model = std::cell::RefCell::new(model);
        let c = model.borrow().config.clone();
        let off = c.position_offset();
        let cfg = LossConfig::new(self.group, vec![0, 1, 2, 3]);
        let step = |b: usize, len: usize, sub: usize| -> anyhow::Result<(u64, f64)> {
            let (queries, passages) =
                train_inputs(&c, b, self.group, self.query_len.min(len), len, 7)?;
            let batch = StepBatch {
                q: pack_in_order(&queries, off),
                p: pack_in_order(&passages, off),
            };
            be.synchronize()?;
            be.reset_peak_memory()?;
            let t0 = Instant::now();
            // The whole training step, as `m3 train` runs it (the update's memory included).
            let input = StepInput {
                batch: &batch,
                loss: &cfg,
                dropout: StepDropout { p: 0.0, seed: 0 },
                sub_batch: (sub > 0).then_some(sub),
                t: 1,
                lr: adamw.lr,
            };
            train_step(
                be,
                &mut model.borrow_mut(),
                &mut opt.borrow_mut(),
                &input,
                &RankLoss::solo(),
            )?;
            be.synchronize()?;
            let peak = be.peak_memory()?.unwrap_or(0);
            Ok((peak, t0.elapsed().as_secs_f64()))
        };
        // A step that runs out of device memory is an answer here, not a failure.
        let fits = |r: anyhow::Result<(u64, f64)>| -> anyhow::Result<Option<(u64, f64)>> {
            match r {
                Ok(v) => Ok(Some(v)),
                Err(e) if format!("{e:#}").contains("OUT_OF_MEMORY") => Ok(None),
                Err(e) => Err(e),
            }
        };
        for &len in &self.lengths {
            for &sub in &self.sub_batch_sizes {
                let available = be.memory_available()?.unwrap_or(0);
                let one = fits(step(1, len, sub))?;
                let two = match one {
                    Some(_) => fits(step(2, len, sub))?,
                    None => None,
                };
                let (max_batch, per, fixed) = match (one, two) {
                    (None, _) => (Some(0), None, None),
                    (Some(_), None) => (Some(1), None, None),
                    (Some((p1, _)), Some((p2, _))) => {
                        let per = p2.saturating_sub(p1);
                        let fixed = p1.saturating_sub(per);
                        (
                            available.saturating_sub(fixed).checked_div(per),
                            Some(per),
                            Some(fixed),
                        )
                    }
                };
                // With sub-batches the cost per query can be tiny and the prediction huge:
                // verify only predictions a step can run in reasonable time.
                let verified = match (self.verify, max_batch) {
                    (true, Some(n)) if (3..=1024).contains(&n) => {
                        Some(fits(step(n as usize, len, sub))?.is_some())
                    }
                    _ => None,
                };
                outln!(
                    "{}",
                    json!({
                        "impl": "m3", "device": be.name(), "compute": dtype.to_string(),
                        "passage_len": len, "query_len": self.query_len.min(len),
                        "group": self.group, "sub_batch": sub,
                        "peak_bytes_batch1": one.map(|v| v.0), "peak_bytes_batch2": two.map(|v| v.0),
                        "bytes_per_query": per, "fixed_bytes": fixed,
                        "available_bytes": available, "max_batch": max_batch,
                        "verified": verified, "step_s": [one.map(|v| v.1), two.map(|v| v.1)],
                    })
                )?;
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
