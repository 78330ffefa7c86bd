//! The `m3` binary: the CLI owns stdout (data) and stderr (progress, warnings).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
