//! The CLI's data lines on stdout, and what a closed reader (`m3 bench gemm | head`) means:
//! the command stops quietly with the status a shell reports for a process ended by
//! SIGPIPE, instead of `println!`'s panic. The signal itself stays ignored (Rust's default),
//! so `m3 serve` is not killed by a client that hangs up.

use std::io::{ErrorKind, Write};

/// The exit status of a command whose stdout reader went away: 128 + SIGPIPE, what
/// `set -o pipefail` sees from `cat` or `yes` in the same place.
pub const BROKEN_PIPE_STATUS: u8 = 141;

/// `println!` that returns the write error instead of panicking on it.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes one line to stdout (the body of [`outln!`]).
pub fn line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_fmt(args)
        .and_then(|()| o.write_all(b"\n"))
        .map_err(|e| anyhow::Error::new(e).context("stdout: write failed"))
}

/// Whether `e` comes from writing to a pipe whose reader has closed it, directly or
/// through a JSON serialiser writing into it.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let kind = c
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| c.downcast_ref::<serde_json::Error>()?.io_error_kind());
        kind == Some(ErrorKind::BrokenPipe)
    })
}
