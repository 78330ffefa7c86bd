//! Helpers shared by the tests that run the `m3` binary.
// Each test binary uses some of these helpers, not all.
#![allow(dead_code)]

pub mod pickles;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A path under `fixtures/`.
pub fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(p)
}

/// Runs the binary with `args`, feeding `stdin`.
pub fn m3(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_m3"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A run that stops on its arguments never reads stdin: a broken pipe is then expected.
    match child.stdin.take().unwrap().write_all(stdin) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.unwrap(),
    }
    child.wait_with_output().unwrap()
}

/// A fresh empty directory for test `name` of this test binary.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("m3-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Standard error of a run, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `m3 search index` of `corpus` with `model` into `index`.
pub fn search_index(model: &Path, corpus: &Path, index: &Path) -> Output {
    m3(
        &[
            "search",
            "index",
            "--model",
            model.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--index",
            index.to_str().unwrap(),
        ],
        b"",
    )
}
