//! A packed batch's sequences, made ready once for every attention call over the batch
//! (each layer's forward and backward) instead of once per call.

use super::Backend;
use crate::error::{shape_err, Result};

/// The offsets `cu_seqlens` of a packed batch (sequence `i` is rows `cu[i]..cu[i+1]`),
/// checked to rise from 0, with what the backend keeps of them for its kernels
/// ([`Backend::SeqsKept`]: CUDA's device copy of the offsets and the flash tiles, uploaded
/// here rather than in every layer, forward and backward).
pub struct Seqs<B: Backend> {
    cu: Vec<u32>,
    kept: B::SeqsKept,
}

impl<B: Backend> Seqs<B> {
    /// Checks `cu_seqlens` (starts at 0, never decreases) and makes the backend's part.
    pub fn new(be: &B, cu_seqlens: &[u32]) -> Result<Self> {
        let ok = cu_seqlens.first() == Some(&0) && cu_seqlens.windows(2).all(|w| w[0] <= w[1]);
        if !ok {
            return shape_err(
                "attention",
                format!("cu_seqlens must rise from 0, got {cu_seqlens:?}"),
            );
        }
        Ok(Seqs {
            cu: cu_seqlens.to_vec(),
            kept: be.keep_seqs(cu_seqlens)?,
        })
    }

    /// The offsets, `sequences + 1` of them.
    pub fn cu_seqlens(&self) -> &[u32] {
        &self.cu
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.cu.len() - 1
    }

    /// Whether there are no sequences.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of all sequences together.
    pub fn tokens(&self) -> usize {
        self.cu[self.cu.len() - 1] as usize
    }

    /// The backend's part.
    pub fn kept(&self) -> &B::SeqsKept {
        &self.kept
    }
}

impl<B: Backend> std::fmt::Debug for Seqs<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seqs")
            .field("cu_seqlens", &self.cu)
            .finish()
    }
}
