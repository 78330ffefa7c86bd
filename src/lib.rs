//! m3: M3-Embedding (BGE-M3) in Rust + CUDA.
//!
//! The crate is laid out as `../shared/DESIGN.md` describes: [`tensor`] holds shapes and
//! device buffers, [`backend`] the kernel-level operations (CPU reference and CUDA), and
//! [`autograd`] the tape that records coarse ops and walks them backwards.

pub mod atomic;
pub mod autograd;
pub mod backend;
pub mod batch;
pub mod collective;
pub mod error;
pub mod gradcheck;
pub mod index;
pub mod model;
pub mod retrieval;
pub mod rng;
pub mod score;
pub mod tensor;
pub mod text;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{DType, HostData, Tensor};
