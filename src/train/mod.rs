//! Fine-tuning (SPEC §5–6): the options (`options`), training data, length buckets and the
//! seeded batch sampler (`data`), the feed that turns the plan into packed batches (`feed`),
//! the model with its f32 masters (`model`), the training forward and backward with
//! sub-batching (`forward`), the unified loss with self-distillation (`loss`), AdamW maths
//! and HF's schedules (`optim`), the optimiser's state on a backend (`optimizer`), the one
//! training step (`step`), checkpoints (`checkpoint`), the metrics file (`metrics`), and
//! the loop (`trainer`).

pub mod arena;
pub mod checkpoint;
pub mod data;
pub mod feed;
pub mod forward;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod optimizer;
pub mod options;
pub mod step;
pub mod trainer;
