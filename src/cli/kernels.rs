//! `m3 kernels`: the resource report build.rs recorded from ptxas.

#[cfg(feature = "cuda")]
use super::out::outln;
use std::process::ExitCode;

/// Prints one row per kernel and architecture.
#[cfg(feature = "cuda")]
pub fn run() -> anyhow::Result<ExitCode> {
    let rows = m3::backend::cuda::kernel_resources();
    outln!(
        "{:<14} {:<32} {:<6} {:>5} {:>8} {:>6} {:>7} {:>7}",
        "module",
        "kernel",
        "arch",
        "regs",
        "smem B",
        "stack",
        "spill-s",
        "spill-l"
    )?;
    for r in rows {
        outln!(
            "{:<14} {:<32} {:<6} {:>5} {:>8} {:>6} {:>7} {:>7}",
            r.module,
            r.kernel,
            r.arch,
            r.registers,
            r.shared_bytes,
            r.stack_bytes,
            r.spill_stores,
            r.spill_loads
        )?;
    }
    eprintln!("{} kernel builds", rows.len());
    Ok(ExitCode::SUCCESS)
}

/// Without the feature there are no kernels to report.
#[cfg(not(feature = "cuda"))]
pub fn run() -> anyhow::Result<ExitCode> {
    eprintln!("this m3 was built without the `cuda` feature: no kernels are embedded (build with --features cuda)");
    Ok(ExitCode::FAILURE)
}
