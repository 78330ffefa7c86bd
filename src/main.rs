//! The `m3` binary: the CLI owns stdout (data) and stderr (progress, warnings).

mod cli;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    cli::main()
}

/// Makes glibc's malloc keep freed memory for reuse instead of handing it back to the OS.
/// Its default serves every block of 128 KB-32 MB+ with a fresh `mmap`, so each layer's
/// activations arrive as new pages that the kernel must zero and fault in (a tenth of an
/// encode on the 2-vCPU VM; BENCHMARKS.md). The cost is that the process keeps its peak
/// heap until it exits. A process-wide policy, so the binary sets it, not the library.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it runs before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
