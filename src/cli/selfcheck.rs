//! `m3 selfcheck`: the model-free self-check (gradient checks and, with a GPU, CUDA vs CPU).

use super::out::outln;

use std::process::ExitCode;

use anyhow::Context;
use m3::backend::cpu::Cpu;
use m3::gradcheck::{check, op_cases, CaseDims, Tolerance};
use m3::rng::Rng;

use super::DeviceArg;

const DIMS: CaseDims = CaseDims {
    rows: 5,
    cols: 7,
    inner: 3,
    vocab: 4,
};

/// Runs the checks, prints a table to stdout, fails when any row fails.
pub fn run(device: DeviceArg, seed: u64) -> anyhow::Result<ExitCode> {
    let mut failed = 0;
    outln!(
        "gradient checks on {} (finite differences, {DIMS:?})",
        m3::backend::Backend::name(&Cpu)
    )?;
    outln!("{:<26} {:>12} {:>6}", "op", "worst ratio", "ok")?;
    for case in op_cases::<Cpu>(&mut Rng::new(seed), DIMS) {
        let reports = check(&Cpu, &case.inputs, &*case.f, Tolerance::default(), seed)
            .with_context(|| format!("gradient check of {}", case.name))?;
        let worst = reports.iter().map(|r| r.worst_ratio).fold(0.0, f64::max);
        let ok = worst <= 1.0;
        failed += usize::from(!ok);
        outln!(
            "{:<26} {:>12.4} {:>6}",
            case.name,
            worst,
            if ok { "yes" } else { "NO" }
        )?;
    }
    failed += device_checks(device, seed)?;
    if failed > 0 {
        eprintln!("selfcheck: {failed} check(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("selfcheck: all checks passed");
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "cuda")]
fn device_checks(device: DeviceArg, seed: u64) -> anyhow::Result<usize> {
    use m3::backend::cuda::Cuda;
    use m3::gradcheck::{cross_check, cross_tolerance};
    use m3::DType;
    let want = match device {
        DeviceArg::Cpu => return Ok(0),
        DeviceArg::Cuda => true,
        DeviceArg::Auto => Cuda::available(),
    };
    if !want {
        eprintln!("no CUDA GPU found: checked the CPU reference only");
        return Ok(0);
    }
    let dev = Cuda::with_kernels(0, super::device::kernel_choices())?;
    dev.set_poison(true);
    outln!(
        "\n{} vs the CPU reference (relative error, forward and backward)",
        m3::backend::Backend::name(&dev)
    )?;
    outln!(
        "{:<26} {:>6} {:>12} {:>10} {:<18}",
        "op",
        "dtype",
        "error",
        "bound",
        "worst part"
    )?;
    let mut failed = 0;
    for dtype in [DType::F32, DType::BF16] {
        for row in cross_check(&dev, DIMS, dtype, seed)? {
            let bound = cross_tolerance(dtype);
            let ok = row.error <= bound;
            failed += usize::from(!ok);
            outln!(
                "{:<26} {:>6} {:>12.3e} {:>10.0e} {:<18}{}",
                row.name,
                dtype.to_string(),
                row.error,
                bound,
                row.worst,
                if ok { "" } else { "  FAIL" }
            )?;
        }
    }
    Ok(failed)
}

#[cfg(not(feature = "cuda"))]
fn device_checks(device: DeviceArg, _seed: u64) -> anyhow::Result<usize> {
    if device == DeviceArg::Cuda {
        anyhow::bail!("this m3 was built without the `cuda` feature; rebuild with --features cuda");
    }
    Ok(0)
}
