//! Fine-tuning (SPEC §5–6). So far: training data, length buckets and the seeded batch
//! sampler (`data`), and AdamW with HF's schedules and clipping (`optim`). The loss and the
//! trainer are the rest of issue 4.

pub mod data;
pub mod optim;
