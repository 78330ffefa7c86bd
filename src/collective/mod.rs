//! Communication between data-parallel training ranks (SPEC §5, cross-device negatives;
//! §6, one global batch per step): the [`Collective`] interface the training step uses,
//! [`Solo`] for one rank, [`ThreadGroup`] where the ranks are threads of one process, each
//! with its own backend, and [`TcpGroup`] where they are processes (on one machine or
//! several) started by a launcher such as torchrun. Every collective waits at most the
//! group's timeout and fails naming the ranks it waited for; a rank that fails tells the
//! others, which then fail naming it, so no rank hangs.

#[cfg(feature = "nccl")]
mod nccl;
mod tcp;
mod threads;

#[cfg(feature = "nccl")]
pub use nccl::NcclGroup;
pub use tcp::TcpGroup;
pub use threads::ThreadGroup;

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::{HostData, Tensor};

/// What the training step needs from the other ranks. All ranks call the same collectives
/// in the same order.
pub trait Collective<B: Backend>: Send + Sync {
    /// This rank, `0..world()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world(&self) -> usize;

    /// Every rank's bytes, in rank order (small metadata: row counts, masked columns).
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Elementwise sum of an f32 tensor over ranks, in place; every rank gets the same
    /// bits (the sum runs in rank order).
    fn all_reduce_sum(&self, be: &B, x: &mut Tensor<B>) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let all = self.all_gather_bytes(&f32_bytes(&be.to_vec_f32(x)?))?;
        be.write_f32(x, &sum_in_rank_order(&all)?)
    }

    /// The rows of every rank's f32 `[n_r, d]` tensor stacked in rank order, and each
    /// rank's row count (counts may differ between ranks).
    fn all_gather_rows(&self, be: &B, x: &Tensor<B>) -> Result<(Tensor<B>, Vec<usize>)> {
        let (n, d) = x.rows_cols();
        let all = self.all_gather_bytes(&f32_bytes(&be.to_vec_f32(x)?))?;
        let mut rows = Vec::with_capacity(all.len());
        let mut flat = Vec::new();
        for (r, b) in all.iter().enumerate() {
            let v = bytes_f32(b);
            if d == 0 || !v.len().is_multiple_of(d) {
                return Err(Error::Collective(format!(
                    "all-gather: rank {r} sent {} values, not rows of {d}",
                    v.len()
                )));
            }
            rows.push(v.len() / d);
            flat.extend(v);
        }
        debug_assert_eq!(rows[self.rank()], n);
        let total = rows.iter().sum();
        Ok((be.upload(HostData::F32(&flat), &[total, d])?, rows))
    }

    /// Waits until every rank reaches this point.
    fn barrier(&self) -> Result<()> {
        self.all_gather_bytes(&[]).map(|_| ())
    }

    /// Tells the other ranks this one failed (they stop with an error naming it).
    fn abort(&self, _why: &str) {}
}

/// The elementwise sum of every rank's f32 values, added in rank order (so every
/// implementation gives the same bits).
fn sum_in_rank_order(all: &[Vec<u8>]) -> Result<Vec<f32>> {
    let n = all.first().map_or(0, |b| b.len() / 4);
    let mut sum = vec![0f32; n];
    for (r, b) in all.iter().enumerate() {
        if b.len() != 4 * n {
            return Err(Error::Collective(format!(
                "all-reduce: rank {r} sent {} values, rank 0 {n}",
                b.len() / 4
            )));
        }
        for (s, x) in sum.iter_mut().zip(bytes_f32(b)) {
            *s += x;
        }
    }
    Ok(sum)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// One rank: every collective returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl<B: Backend> Collective<B> for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
}

/// The ranks of a process-local or multi-process group, for code that runs either.
#[derive(Clone)]
pub enum HostGroup {
    /// Ranks as threads of this process.
    Threads(ThreadGroup),
    /// Ranks as processes joined over TCP.
    Tcp(Arc<TcpGroup>),
}

impl HostGroup {
    /// This rank's index.
    pub fn index(&self) -> usize {
        match self {
            HostGroup::Threads(g) => g.index(),
            HostGroup::Tcp(g) => g.index(),
        }
    }

    /// Marks this rank failed (the others stop naming it).
    pub fn fail(&self, why: &str) {
        match self {
            HostGroup::Threads(g) => g.fail(why),
            HostGroup::Tcp(g) => g.fail(why),
        }
    }
}

impl<B: Backend> Collective<B> for HostGroup {
    fn rank(&self) -> usize {
        self.index()
    }
    fn world(&self) -> usize {
        match self {
            HostGroup::Threads(g) => Collective::<B>::world(g),
            HostGroup::Tcp(g) => g.size(),
        }
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        match self {
            HostGroup::Threads(g) => Collective::<B>::all_gather_bytes(g, mine),
            HostGroup::Tcp(g) => g.all_gather(mine),
        }
    }
    fn all_reduce_sum(&self, be: &B, x: &mut Tensor<B>) -> Result<()> {
        match self {
            HostGroup::Threads(g) => g.all_reduce_sum(be, x),
            HostGroup::Tcp(g) => Collective::<B>::all_reduce_sum(&**g, be, x),
        }
    }
    fn abort(&self, why: &str) {
        self.fail(why);
    }
}
