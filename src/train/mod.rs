//! Fine-tuning (SPEC §5–6): training data, length buckets and the seeded batch sampler
//! (`data`), the model with its f32 masters (`model`), the training forward and backward
//! with sub-batching (`forward`), the unified loss with self-distillation (`loss`), AdamW
//! with HF's schedules and clipping (`optim`), and the loop with checkpoints (`trainer`).

pub mod data;
pub mod forward;
pub mod loss;
pub mod model;
pub mod optim;
pub mod trainer;
