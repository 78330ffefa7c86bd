//! Choosing the backend for a command: `--device auto|cpu|cuda`.

use std::process::ExitCode;

use m3::backend::cpu::Cpu;
use m3::backend::Backend;
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

/// Runs `job` on the chosen device: CPU in f32; CUDA with bf16 weights and activations.
pub fn on_device(device: DeviceArg, job: impl Job) -> anyhow::Result<ExitCode> {
    #[cfg(feature = "cuda")]
    {
        use m3::backend::cuda::Cuda;
        let cuda = match device {
            DeviceArg::Cuda => true,
            DeviceArg::Auto => Cuda::available(),
            DeviceArg::Cpu => false,
        };
        if cuda {
            let be = Cuda::with_kernels(0, kernel_choices())?;
            return job.run(&be, DType::BF16);
        }
    }
    #[cfg(not(feature = "cuda"))]
    if device == DeviceArg::Cuda {
        anyhow::bail!("this m3 was built without the `cuda` feature; rebuild with --features cuda or use --device cpu");
    }
    job.run(&Cpu, DType::F32)
}
