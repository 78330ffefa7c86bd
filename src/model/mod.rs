//! The model: configuration, checkpoint reading, weights, encoder and heads.

pub mod checkpoint;
pub mod config;
pub mod embedder;
pub mod encoder;
pub mod heads;
pub mod params;
pub mod random;
pub mod torch_pickle;
pub mod torch_save;
pub mod weights;
