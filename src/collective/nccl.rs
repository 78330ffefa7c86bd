//! Ranks on GPUs joined by NCCL (cargo feature `nccl`, through cudarc; libnccl is loaded
//! at run time like libcuda, so a binary built with it still runs where it is missing and
//! says so when asked for it). Rank 0 creates the NCCL unique id and hands it to the others
//! through the TCP group at `MASTER_ADDR:MASTER_PORT`. Gradients are all-reduced on the
//! device, no host copy; small metadata goes through padded device all-gathers.
//!
//! Compiled, not yet run on a GPU (the project's GPU machine has one GPU, and NCCL refuses
//! two ranks on one; world size 1 is the bundle's check). NCCL's own collectives have no
//! timeout here: a rank that dies inside one leaves the others waiting (an
//! `ncclCommAbort` watchdog is the missing piece).

use std::sync::Mutex;

use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{Collective, TcpGroup};
use crate::backend::cuda::{Cuda, CudaStorage};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The communicator, used by one call at a time.
struct CommCell(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap, which the Mutex around it guarantees.
unsafe impl Send for CommCell {}

/// One rank of a group of GPUs joined by NCCL.
pub struct NcclGroup {
    comm: Mutex<CommCell>,
    rank: usize,
    world: usize,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Collective(format!("NCCL {what}: {e:?}"))
}

impl NcclGroup {
    /// Whether libnccl can be loaded.
    pub fn available() -> bool {
        // SAFETY: this only tries dlopen on the candidate library names.
        unsafe { cudarc::nccl::sys::is_culib_present() }
    }

    /// Joins the NCCL group of `boot`'s ranks on `be`'s GPU and stream.
    pub fn join(be: &Cuda, boot: &TcpGroup) -> Result<Self> {
        if !Self::available() {
            return Err(Error::Collective(
                "--ddp-backend nccl: libnccl.so cannot be loaded (put it on LD_LIBRARY_PATH; \
                 where only libnccl.so.2 exists, as in PyTorch's wheel, link libnccl.so to it) \
                 or use --ddp-backend host"
                    .into(),
            ));
        }
        let (rank, world) = (boot.index(), boot.size());
        let mine: Vec<u8> = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let all = boot.all_gather(&mine)?;
        let raw: [std::ffi::c_char; 128] = all[0]
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| Error::Collective("rank 0 sent a malformed NCCL id".into()))?;
        let comm = Comm::from_rank(be.stream().clone(), rank, world, Id::uninit(raw))
            .map_err(|e| nccl_err("init", e))?;
        Ok(NcclGroup {
            comm: Mutex::new(CommCell(comm)),
            rank,
            world,
        })
    }
}

impl Collective<Cuda> for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    /// Lengths first, then every rank's bytes padded to the longest, both as device
    /// all-gathers.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let cell = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let comm = &cell.0;
        let stream = comm.stream();
        let e = |what: &'static str| move |err| nccl_err(what, err);
        let len = stream
            .clone_htod(&[mine.len() as u64])
            .map_err(e("upload"))?;
        let mut lens = stream.alloc_zeros::<u64>(self.world).map_err(e("alloc"))?;
        comm.all_gather(&len, &mut lens)
            .map_err(|x| nccl_err("all-gather", x))?;
        let lens = stream.clone_dtoh(&lens).map_err(e("download"))?;
        let most = lens.iter().copied().max().unwrap_or(0).max(1) as usize;
        let mut padded = mine.to_vec();
        padded.resize(most, 0);
        let send = stream.clone_htod(&padded).map_err(e("upload"))?;
        let mut recv = stream
            .alloc_zeros::<u8>(most * self.world)
            .map_err(e("alloc"))?;
        comm.all_gather(&send, &mut recv)
            .map_err(|x| nccl_err("all-gather", x))?;
        let all = stream.clone_dtoh(&recv).map_err(e("download"))?;
        Ok(all
            .chunks(most)
            .zip(lens)
            .map(|(c, n)| c[..n as usize].to_vec())
            .collect())
    }

    /// In place on the device.
    fn all_reduce_sum(&self, _be: &Cuda, x: &mut Tensor<Cuda>) -> Result<()> {
        if self.world == 1 || x.numel() == 0 {
            return Ok(());
        }
        let cell = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        match x.storage_mut() {
            CudaStorage::F32(s) => cell
                .0
                .all_reduce_in_place(s, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| nccl_err("all-reduce", e)),
            _ => Err(Error::Collective(
                "NCCL all-reduce: the gradient arena must be f32".into(),
            )),
        }
    }
}
