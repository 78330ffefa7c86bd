//! Fine-tuning (SPEC §5–6). So far: training data, length buckets and the seeded batch
//! sampler (`data`), the unified loss with self-distillation on the tape (`loss`), and
//! AdamW with HF's schedules and clipping (`optim`). The trainer, sub-batching, `m3 train`
//! and the demo are the rest of issue 4.

pub mod data;
pub mod forward;
pub mod loss;
pub mod optim;
