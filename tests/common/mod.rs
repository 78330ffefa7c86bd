//! Helpers shared by the tests that run the `m3` binary.
// Each test binary uses some of these helpers, not all.
#![allow(dead_code)]

pub mod pickles;
pub mod steps;

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

/// A test's scratch directory: removed when the test is done, kept when it panics (to be
/// looked at; the failure message names the paths).
pub struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

/// A fresh empty directory for test `name` of this test binary.
pub fn tmp(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("m3-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

/// Standard error of a run, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `m3 search index` of `corpus` with `model` into `index`, held by `engine` (qdrant, m3).
pub fn search_index(model: &Path, corpus: &Path, index: &Path, engine: &str) -> Output {
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
            "--engine",
            engine,
        ],
        b"",
    )
}

/// The first `n` passages of the demo corpus written to `dir/name` as `{"id", "text",
/// "lang"}` lines (`lang` a field for the index to keep), and their (id, text) pairs.
pub fn demo_corpus(dir: &Path, n: usize, name: &str) -> (PathBuf, Vec<(String, String)>) {
    let all = std::fs::read_to_string(fixture("demo/corpus.jsonl")).unwrap();
    let (mut out, mut rows) = (Vec::new(), Vec::new());
    for l in all.lines().take(n) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let (id, text) = (v["id"].as_str().unwrap(), v["text"].as_str().unwrap());
        let lang = format!("l{}", text.len() % 3);
        let line = serde_json::json!({"id": id, "text": text, "lang": lang});
        writeln!(out, "{line}").unwrap();
        rows.push((id.to_string(), text.to_string()));
    }
    let p = dir.join(name);
    std::fs::write(&p, out).unwrap();
    (p, rows)
}

/// The first `n` demo queries as `m3 search query` input lines `{"id": i, "text"}`.
pub fn demo_queries(n: usize) -> Vec<u8> {
    let all = std::fs::read_to_string(fixture("demo/queries.jsonl")).unwrap();
    let mut input = Vec::new();
    for (i, l) in all.lines().take(n).enumerate() {
        let q = serde_json::from_str::<serde_json::Value>(l).unwrap()["query"].clone();
        writeln!(input, "{}", serde_json::json!({"id": i, "text": q})).unwrap();
    }
    input
}

/// Runs `m3 args` on `input`, which must succeed, and parses each output line as JSON.
pub fn json_lines(args: &[&str], input: &[u8]) -> Vec<serde_json::Value> {
    let out = m3(args, input);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (id, hybrid, dense, sparse, colbert) per result.
pub type Ranked = Vec<(String, f32, f32, f32, f32)>;

pub fn ranked(line: &serde_json::Value) -> Ranked {
    line["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let f = |k: &str| r[k].as_f64().unwrap() as f32;
            let id = r["id"].as_str().unwrap().to_string();
            (id, f("score"), f("dense"), f("sparse"), f("colbert"))
        })
        .collect()
}

/// Same scores at every rank (to the bit), and the same passage wherever its hybrid score
/// is held by no other result: exactly tied passages (the fixture model maps many texts to
/// the same ids) may come in any order, or be cut at different members.
pub fn assert_same(a: &Ranked, b: &Ranked, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (r, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(
            (x.1, x.2, x.3, x.4),
            (y.1, y.2, y.3, y.4),
            "{what}: rank {r}: {a:?} vs {b:?}"
        );
        let tied = a.iter().filter(|z| z.1 == x.1).count() > 1;
        if !tied {
            assert_eq!(x.0, y.0, "{what}: rank {r}");
        }
    }
}

/// A random model in `dir` with the tiny fixture's tokenizer and vocabulary but half its
/// width (dense size 16 where the fixture's is 32): one an index of the fixture refuses.
pub fn narrower_model(dir: &Path) -> PathBuf {
    let args = [
        "bench",
        "make-model",
        "--out",
        dir.to_str().unwrap(),
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--intermediate",
        "32",
        "--vocab",
        "481",
        "--positions",
        "1026",
    ];
    let out = m3(&args, b"");
    assert!(out.status.success(), "{}", stderr(&out));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(fixture("tiny-m3").join(f), dir.join(f)).unwrap();
    }
    dir.to_path_buf()
}
