//! The model: configuration, checkpoint reading, weights, encoder and heads.

pub mod checkpoint;
pub mod torch_pickle;
