//! Choosing the backend for a command: `--device auto|cpu|cuda`.

use std::process::ExitCode;

use m3::backend::cpu::Cpu;
use m3::backend::Backend;
use m3::collective::{Collective, HostGroup, ThreadGroup};
use m3::DType;

use super::DeviceArg;

/// A command body that runs on any backend, with weights in `dtype`.
pub trait Job {
    /// Runs the command.
    fn run<B: Backend>(self, be: &B, dtype: DType) -> anyhow::Result<ExitCode>;
}

/// The CUDA kernel variants chosen by the environment: `M3_ATTENTION=naive|flash-ldm`,
/// `M3_ATTENTION_BWD=flash`, `M3_MAXSIM=gemm`, `M3_GELU=epilogue` (README "With CUDA").
#[cfg(feature = "cuda")]
pub fn kernel_choices() -> m3::backend::cuda::KernelChoices {
    let is = |var: &str, value: &str| std::env::var(var).as_deref() == Ok(value);
    m3::backend::cuda::KernelChoices {
        flash_backward: is("M3_ATTENTION_BWD", "flash"),
        flash_ldmatrix: is("M3_ATTENTION", "flash-ldm"),
        attention_naive: is("M3_ATTENTION", "naive"),
        maxsim_gemm: is("M3_MAXSIM", "gemm"),
        gelu_epilogue: is("M3_GELU", "epilogue"),
    }
}

/// Whether `--device` picks the GPU (`auto`: when one is present); asking for CUDA from a
/// build without it is an error saying how to get it.
fn use_cuda(device: DeviceArg) -> anyhow::Result<bool> {
    #[cfg(feature = "cuda")]
    return Ok(match device {
        DeviceArg::Cuda => true,
        DeviceArg::Auto => m3::backend::cuda::Cuda::available(),
        DeviceArg::Cpu => false,
    });
    #[cfg(not(feature = "cuda"))]
    {
        if device == DeviceArg::Cuda {
            anyhow::bail!("this m3 was built without the `cuda` feature; rebuild with --features cuda or use --device cpu");
        }
        Ok(false)
    }
}

/// Runs `job` on the chosen device: CPU in f32; CUDA with bf16 weights and activations.
pub fn on_device(device: DeviceArg, job: impl Job) -> anyhow::Result<ExitCode> {
    #[cfg(feature = "cuda")]
    if use_cuda(device)? {
        let be = m3::backend::cuda::Cuda::with_kernels(0, kernel_choices())?;
        return job.run(&be, DType::BF16);
    }
    #[cfg(not(feature = "cuda"))]
    use_cuda(device)?;
    job.run(&Cpu, DType::F32)
}

/// A command body run once per data-parallel rank, each rank on its own backend.
pub trait RankJob: Sync {
    /// Runs rank `comm.rank()`.
    fn run_rank<B: Backend>(
        &self,
        be: &B,
        dtype: DType,
        comm: &dyn Collective<B>,
    ) -> anyhow::Result<()>;
}

/// Runs `job` once per rank of `ranks`, each in its own thread on its own backend (CUDA:
/// GPU `rank mod device count`). A rank that fails or panics stops the others; the error
/// returned is the first rank's own failure, not the "rank k stopped" of those it stopped.
pub fn on_ranks(
    device: DeviceArg,
    ranks: Vec<ThreadGroup>,
    job: &impl RankJob,
) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|g| {
                let local = g.index();
                s.spawn(move || on_rank(device, local, false, job, &HostGroup::Threads(g)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a rank thread died")))
            })
            .collect()
    });
    let stopped = |e: &anyhow::Error| format!("{e:#}").contains("collective: rank ");
    let mut errors: Vec<anyhow::Error> = results.into_iter().filter_map(Result::err).collect();
    match errors.iter().position(|e| !stopped(e)) {
        Some(k) => Err(errors.swap_remove(k)),
        None if !errors.is_empty() => Err(errors.swap_remove(0)),
        None => Ok(()),
    }
}

/// Runs one rank of `job` on the chosen device (CUDA: GPU `local mod device count`), its
/// gradients exchanged through `g`, or with `nccl` over NCCL (bootstrapped through `g`,
/// which must then be a TCP group); a failure or panic is passed to the other ranks before
/// it is returned, naming the rank.
pub fn on_rank(
    device: DeviceArg,
    local: usize,
    nccl: bool,
    job: &impl RankJob,
    g: &HostGroup,
) -> anyhow::Result<()> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_rank_on(device, local, nccl, job, g)
    }));
    let r = r.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(anyhow::anyhow!("panicked: {msg}"))
    });
    r.map_err(|e| {
        g.fail(&format!("{e:#}"));
        e.context(format!("rank {}", g.index()))
    })
}

fn run_rank_on(
    device: DeviceArg,
    local: usize,
    nccl: bool,
    job: &impl RankJob,
    g: &HostGroup,
) -> anyhow::Result<()> {
    let _ = local;
    #[cfg(feature = "cuda")]
    if use_cuda(device)? {
        use m3::backend::cuda::Cuda;
        let be = Cuda::with_kernels(local % Cuda::device_count()?.max(1), kernel_choices())?;
        if nccl {
            #[cfg(feature = "nccl")]
            {
                let HostGroup::Tcp(boot) = g else {
                    anyhow::bail!("--ddp-backend nccl runs ranks as processes (a launcher's RANK, WORLD_SIZE, ...), not --nproc-per-node threads");
                };
                let n = m3::collective::NcclGroup::join(&be, boot)?;
                return job.run_rank(&be, DType::BF16, &n);
            }
            #[cfg(not(feature = "nccl"))]
            anyhow::bail!("--ddp-backend nccl: this m3 was built without the `nccl` feature; rebuild with --features nccl or use --ddp-backend host");
        }
        return job.run_rank(&be, DType::BF16, g);
    }
    #[cfg(not(feature = "cuda"))]
    use_cuda(device)?;
    if nccl {
        anyhow::bail!("--ddp-backend nccl needs CUDA GPUs; on the CPU use --ddp-backend host");
    }
    job.run_rank(&Cpu, DType::F32, g)
}
