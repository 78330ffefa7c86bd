//! Hostile and careless input (issue 11): no data loss, no panic, memory bounded by the
//! input. Each test builds its bad file itself and runs the real binary or reader.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::pickles::{memo_doubling, nested_lists, nested_tuples, state_dict, torch_zip};
use common::{fixture, m3, search_index, stderr, tmp};
use m3::model::checkpoint::read_checkpoint;
use m3::model::torch_pickle::read_state_dict;
use serde_json::Value;

const MODEL: &str = "--model";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn failed_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "succeeded: {}", stderr(out));
    let e = stderr(out);
    assert!(e.contains(needle), "error does not mention {needle:?}: {e}");
    assert!(!e.contains("panicked"), "panicked: {e}");
}

fn ok(out: &Output) {
    assert!(out.status.success(), "{}", stderr(out));
}

/// A copy of the fixture model (files only) to damage.
fn model_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(fixture("tiny-m3")).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
        }
    }
    m
}

fn edit_config(model: &Path, f: impl FnOnce(&mut Value)) {
    let p = model.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
}

fn corpus(dir: &Path, n: usize) -> PathBuf {
    let words = [
        "alpha", "beta", "gamma", "delta", "fox", "Paris", "capital", "river",
    ];
    let mut c = Vec::new();
    for i in 0..n {
        let text: Vec<&str> = (0..3 + i % 5).map(|k| words[(i * 7 + k) % 8]).collect();
        writeln!(
            c,
            "{}",
            serde_json::json!({"id": format!("p{i}"), "text": text.join(" ")})
        )
        .unwrap();
    }
    let p = dir.join("corpus.jsonl");
    std::fs::write(&p, c).unwrap();
    p
}

/// m3's own index: these tests damage its files on purpose.
fn index(model: &Path, corpus: &Path, idx: &Path) -> Output {
    search_index(model, corpus, idx, "m3")
}

fn query(model: &Path, index: &Path) -> Output {
    m3(
        &["search", "query", MODEL, s(model), "--index", s(index)],
        b"\"alpha beta\"\n",
    )
}

// ---- data loss ----

/// Runs `args` (one query line in), which must be refused as overwriting `file`, and
/// checks `file` is unchanged.
fn refused_and_kept(args: &[&str], file: &Path) {
    let before = std::fs::read(file).unwrap();
    failed_with(&m3(args, b"\"x\"\n"), "same file");
    assert_eq!(
        std::fs::read(file).unwrap(),
        before,
        "{} changed",
        file.display()
    );
}

#[test]
fn an_output_that_is_an_input_is_refused_and_the_input_kept() {
    let d = tmp("clobber");
    let model = fixture("tiny-m3");
    let input = d.join("in.jsonl");
    let text = "\"alpha beta\"\n\"gamma\"\n";
    std::fs::write(&input, text).unwrap();
    std::os::unix::fs::symlink(&input, d.join("link.jsonl")).unwrap();
    let dotted = format!("{}/./in.jsonl", d.display());
    for out in [s(&input), s(&d.join("link.jsonl")), dotted.as_str()] {
        let r = m3(
            &[
                "encode",
                MODEL,
                s(&model),
                "--input",
                s(&input),
                "--output",
                out,
            ],
            b"",
        );
        failed_with(&r, "same file");
        assert_eq!(std::fs::read_to_string(&input).unwrap(), text);
    }
    let pairs = d.join("pairs.jsonl");
    let pair_text = "{\"query\": \"a\", \"passage\": \"b\"}\n";
    std::fs::write(&pairs, pair_text).unwrap();
    let r = m3(
        &[
            "score",
            MODEL,
            s(&model),
            "--input",
            s(&pairs),
            "--output",
            s(&pairs),
        ],
        b"",
    );
    failed_with(&r, "same file");
    assert_eq!(std::fs::read_to_string(&pairs).unwrap(), pair_text);
    // An output over a model file would destroy the model.
    let m = model_copy(&d);
    let cfg = m.join("config.json");
    refused_and_kept(&["encode", MODEL, s(&m), "--output", s(&cfg)], &cfg);
    // search query: --output over the index's own files.
    let c = corpus(&d, 6);
    let idx = d.join("idx");
    ok(&index(&model, &c, &idx));
    let meta = idx.join("meta.json");
    refused_and_kept(
        &[
            "search",
            "query",
            MODEL,
            s(&model),
            "--index",
            s(&idx),
            "--output",
            s(&meta),
        ],
        &meta,
    );
    // An npy directory or an index holding the input or the model is refused.
    let r = m3(
        &[
            "encode",
            MODEL,
            s(&model),
            "--input",
            s(&input),
            "--npy-dir",
            s(&d),
        ],
        b"",
    );
    failed_with(&r, "holds");
    let r = index(&m, &c, &d);
    failed_with(&r, "holds");
    assert!(c.exists() && m.join("model.safetensors").exists());
}

#[test]
fn train_metrics_over_the_data_and_an_output_dir_holding_the_model_are_refused() {
    let d = tmp("train-clobber");
    let data = d.join("train.jsonl");
    let rec = "{\"query\": \"q\", \"pos\": [\"p\"], \"neg\": [\"n\"]}\n";
    std::fs::write(&data, rec).unwrap();
    let model = model_copy(&d);
    let base = |out: &Path, metrics: &Path| {
        m3(
            &[
                "train",
                MODEL,
                s(&model),
                "--data",
                s(&data),
                "--output-dir",
                s(out),
                "--metrics",
                s(metrics),
                "--max-steps",
                "1",
                "--train-group-size",
                "2",
            ],
            b"",
        )
    };
    failed_with(&base(&d.join("out"), &data), "same file");
    assert_eq!(std::fs::read_to_string(&data).unwrap(), rec);
    failed_with(&base(&d, &d.join("m.jsonl")), "holds");
    assert!(model.join("model.safetensors").exists());
}

/// `m3 train` on two records with the given extra flags.
fn train(d: &Path, out: &Path, extra: &[&str]) -> Output {
    let data = d.join("train.jsonl");
    if !data.exists() {
        std::fs::write(
            &data,
            "{\"query\": \"capital of France\", \"pos\": [\"Paris is the capital.\"], \"neg\": [\"The fox jumps.\"]}\n\
             {\"query\": \"schneller Fuchs\", \"pos\": [\"Der schnelle braune Fuchs\"], \"neg\": [\"Paris\"]}\n",
        )
        .unwrap();
    }
    let model = fixture("tiny-m3");
    let mut args = vec![
        "train",
        MODEL,
        s(&model),
        "--data",
        s(&data),
        "--output-dir",
        s(out),
        "--per-device-train-batch-size",
        "2",
        "--save-steps",
        "1",
    ];
    for (flag, default) in [("--save-total-limit", "1"), ("--train-group-size", "2")] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    args.extend_from_slice(extra);
    m3(&args, b"")
}

fn assert_self_contained(dir: &Path) {
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "colbert_linear.pt",
    ] {
        assert!(dir.join(f).is_file(), "{} lacks {f}", dir.display());
    }
}

#[test]
fn resumed_checkpoints_under_a_retention_limit_stay_self_contained() {
    let d = tmp("retention");
    let out = d.join("out");
    // Six steps keeping two checkpoints; then, as if the run had died after step 5, the
    // newest checkpoint and the final model go.
    ok(&train(
        &d,
        &out,
        &["--max-steps", "6", "--save-total-limit", "2"],
    ));
    std::fs::remove_dir_all(out.join("checkpoint-6")).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    let cp5 = out.join("checkpoint-5");
    assert!(cp5.is_dir());
    // The resumed run takes config and tokenizer from checkpoint-5, which the limit of 1
    // deletes once checkpoint-6 is written: every later file must still have them.
    ok(&train(&d, &out, &["--max-steps", "6", "--resume"]));
    assert!(!cp5.exists(), "the retention limit kept checkpoint-5");
    assert_self_contained(&out.join("checkpoint-6"));
    assert_self_contained(&out);
    // And that checkpoint is resumable in turn.
    std::fs::remove_file(out.join("model.safetensors")).unwrap();
    ok(&train(&d, &out, &["--max-steps", "6", "--resume"]));
    assert_self_contained(&out);
}

#[test]
fn a_new_index_replaces_the_old_whole_and_a_failed_build_keeps_it() {
    let d = tmp("index-replace");
    let model = fixture("tiny-m3");
    let idx = d.join("idx");
    ok(&index(&model, &corpus(&d, 8), &idx));
    let before = std::fs::read(idx.join("meta.json")).unwrap();
    // A corpus that fails at its last line: nothing replaced.
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "\"alpha\"\n\"beta\"\n{broken\n").unwrap();
    failed_with(&index(&model, &bad, &idx), "bad.jsonl:3");
    assert_eq!(std::fs::read(idx.join("meta.json")).unwrap(), before);
    ok(&query(&model, &idx));
    // A directory that is not an index is never replaced.
    let docs = d.join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("thesis.tex"), "years").unwrap();
    failed_with(&index(&model, &corpus(&d, 3), &docs), "thesis.tex");
    assert!(docs.join("thesis.tex").exists());
    // A second index replaces the first; nothing temporary is left beside it.
    ok(&index(&model, &corpus(&d, 3), &idx));
    let meta: Value =
        serde_json::from_slice(&std::fs::read(idx.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["count"], 3);
    let names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains("m3-tmp")), "{names:?}");
}

// ---- crashes on bad files ----

#[test]
fn deeply_nested_pickles_are_errors_not_stack_overflows() {
    for p in [nested_lists(1_000_000), nested_tuples(1_000_000)] {
        let e = read_state_dict(&p).unwrap_err();
        assert!(e.contains("nested deeper"), "{e}");
    }
    // Depth within the bound still parses up to the (wrong) top-level object.
    let e = read_state_dict(&nested_lists(50)).unwrap_err();
    assert!(e.contains("not a dict"), "{e}");
}

#[test]
fn memo_doubling_and_stride_zero_views_are_refused_before_allocating() {
    let e = read_state_dict(&memo_doubling(60)).unwrap_err();
    assert!(e.contains("far more data"), "{e}");
    let d = tmp("stride0");
    let p = d.join("colbert_linear.pt");
    let storage: Vec<u8> = (0..4).flat_map(|i| (i as f32).to_le_bytes()).collect();
    for (size, stride) in [
        (vec![1u64 << 40], vec![0u64]),
        (vec![1 << 20, 1 << 20], vec![0, 0]),
        (vec![u64::MAX / 2, 3], vec![0, 1]),
    ] {
        std::fs::write(&p, torch_zip(&state_dict(4, 0, &size, &stride), &storage)).unwrap();
        let e = read_checkpoint(&p).unwrap_err().to_string();
        assert!(
            e.contains("colbert_linear.pt") && e.contains("weight"),
            "{e}"
        );
    }
    // The same file with a plain view reads.
    std::fs::write(&p, torch_zip(&state_dict(4, 0, &[2, 2], &[2, 1]), &storage)).unwrap();
    assert_eq!(
        read_checkpoint(&p).unwrap()["weight"].data,
        vec![0.0, 1.0, 2.0, 3.0]
    );
}

#[test]
fn bad_shapes_in_config_heads_and_indexes_are_errors_naming_the_file() {
    let d = tmp("shapes");
    // A 0-d colbert head weight, and one with 0 rows.
    for shape in [vec![], vec![0usize, 32]] {
        let m = model_copy(&d.join(format!("h{}", shape.len())));
        std::fs::remove_file(m.join("colbert_linear.pt")).unwrap();
        let n: usize = shape.iter().product();
        let data = vec![0f32; n];
        m3::model::checkpoint::write_safetensors(
            &m.join("colbert_linear.safetensors"),
            &[
                ("weight".into(), shape.clone(), &data),
                ("bias".into(), vec![0], &[]),
            ],
        )
        .unwrap();
        let r = m3(
            &["encode", MODEL, s(&m), "--outputs", "colbert"],
            b"\"x\"\n",
        );
        failed_with(&r, "colbert_linear.safetensors");
    }
    // Config values that used to panic or wrap.
    for (key, v, needle) in [
        ("type_vocab_size", Value::from(0), "type_vocab_size"),
        (
            "pad_token_id",
            Value::from(4_294_967_295u64),
            "pad_token_id",
        ),
        ("vocab_size", Value::from(10), "vocab_size"),
    ] {
        let m = model_copy(&d.join(key));
        edit_config(&m, |c| c[key] = v);
        let r = m3(&["encode", MODEL, s(&m)], b"\"alpha\"\n");
        failed_with(&r, needle);
        assert!(stderr(&r).contains("config.json"), "{}", stderr(&r));
        if key == "vocab_size" {
            assert!(stderr(&r).contains("tokenizer.json"), "{}", stderr(&r));
        }
    }
}

/// Rewrites an index's meta.json through `f`, keeping its self-checksum valid, so the
/// loader's own checks (not the checksum) must catch the damage.
fn edit_meta(idx: &Path, f: impl FnOnce(&mut Value)) {
    let p = idx.join("meta.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    v["checksum"] = Value::from(m3::index::meta_checksum(&v));
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn damaged_indexes_are_errors_naming_what_is_wrong() {
    let d = tmp("damaged");
    let model = fixture("tiny-m3");
    let idx = d.join("idx");
    ok(&index(&model, &corpus(&d, 6), &idx));
    let copy = |name: &str| {
        let c = d.join(name);
        let _ = std::fs::remove_dir_all(&c);
        std::fs::create_dir(&c).unwrap();
        for f in m3::index::FILES {
            std::fs::copy(idx.join(f), c.join(f)).unwrap();
        }
        c
    };
    let c = copy("short-ids");
    edit_meta(&c, |m| {
        m["ids"].as_array_mut().unwrap().pop();
    });
    failed_with(&query(&model, &c), "5 ids for 6 passages");
    let c = copy("offsets");
    edit_meta(&c, |m| {
        let o = m["colbert_offsets"].as_array_mut().unwrap();
        *o.last_mut().unwrap() = Value::from(1_000_000);
    });
    failed_with(&query(&model, &c), "colbert.safetensors");
    let c = copy("decreasing");
    edit_meta(&c, |m| {
        m["colbert_offsets"][1] = Value::from(1_000_000);
    });
    failed_with(&query(&model, &c), "non-decreasing");
    // A bit flip anywhere in a data file, or in meta.json itself.
    for f in m3::index::FILES {
        let c = copy(&format!("flip-{f}"));
        let p = c.join(f);
        let mut b = std::fs::read(&p).unwrap();
        let at = b.len() - 3;
        b[at] ^= 0x10;
        std::fs::write(&p, b).unwrap();
        let r = query(&model, &c);
        assert!(!r.status.success(), "a flipped bit in {f} went unnoticed");
        assert!(stderr(&r).contains(f), "{}", stderr(&r));
    }
    ok(&query(&model, &idx));
}

#[test]
fn an_index_refuses_another_model_and_nan_vectors() {
    let d = tmp("fingerprint");
    let model = fixture("tiny-m3");
    let idx = d.join("idx");
    ok(&index(&model, &corpus(&d, 5), &idx));
    // Another colbert head of another width.
    let other = model_copy(&d.join("narrow"));
    std::fs::remove_file(other.join("colbert_linear.pt")).unwrap();
    let hidden = 32;
    let w = vec![0.1f32; 16 * hidden];
    let b = vec![0f32; 16];
    m3::model::checkpoint::write_safetensors(
        &other.join("colbert_linear.safetensors"),
        &[
            ("weight".into(), vec![16, hidden], &w),
            ("bias".into(), vec![16], &b),
        ],
    )
    .unwrap();
    failed_with(&query(&other, &idx), "colbert size");
    // The same head file re-saved with other values: same sizes, other weights.
    let nudged = model_copy(&d.join("nudged"));
    let p = nudged.join("sparse_linear.pt");
    let mut t = read_checkpoint(&p).unwrap();
    let wt = t.get_mut("weight").unwrap();
    wt.data[0] += 0.5;
    let tensors: Vec<(String, Vec<usize>, &[f32])> = t
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone(), v.data.as_slice()))
        .collect();
    m3::model::torch_save::write_torch_state_dict(&p, &tensors).unwrap();
    failed_with(&query(&nudged, &idx), "sparse_linear.pt differs");
    // A model whose colbert head yields NaN: refused at index time.
    let nan = model_copy(&d.join("nan"));
    let p = nan.join("colbert_linear.pt");
    let mut t = read_checkpoint(&p).unwrap();
    t.get_mut("bias").unwrap().data[0] = f32::NAN;
    let tensors: Vec<(String, Vec<usize>, &[f32])> = t
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone(), v.data.as_slice()))
        .collect();
    m3::model::torch_save::write_torch_state_dict(&p, &tensors).unwrap();
    let nidx = d.join("nan-idx");
    failed_with(&index(&nan, &corpus(&d, 3), &nidx), "NaN");
    assert!(!nidx.exists());
}

// ---- memory and options ----

#[test]
fn lengths_that_leave_no_room_and_group_sizes_the_data_cannot_fill_are_errors() {
    let model = fixture("tiny-m3");
    for n in ["0", "1", "2"] {
        let r = m3(&["encode", MODEL, s(&model), "--max-length", n], b"\"x\"\n");
        failed_with(&r, "--max-length");
    }
    let d = tmp("group");
    let r = train(
        &d,
        &d.join("out"),
        &["--max-steps", "1", "--train-group-size", "1000000"],
    );
    failed_with(&r, "--train-group-size 1000000 needs 999999 negatives");
    let r = train(
        &d,
        &d.join("out"),
        &["--max-steps", "1", "--query-max-len", "2"],
    );
    failed_with(&r, "--query-max-len");
}

#[test]
fn a_line_past_the_limit_is_an_error_naming_it_and_a_long_text_is_cut() {
    let model = fixture("tiny-m3");
    // 3 MB of words in one line: cut before tokenizing, encoded as its first tokens.
    let long: String = std::iter::repeat_n("alpha beta ", 300_000).collect();
    let input = format!(
        "\"alpha beta\"\n{}\n",
        serde_json::to_string(&long).unwrap()
    );
    let r = m3(
        &[
            "encode",
            MODEL,
            s(&model),
            "--max-length",
            "8",
            "--outputs",
            "dense",
        ],
        input.as_bytes(),
    );
    ok(&r);
    assert!(stderr(&r).contains("text(s) were longer"), "{}", stderr(&r));
    let v: Vec<Value> = String::from_utf8(r.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len(), 2);
    // A line over the documented limit: an error naming the line.
    let mut huge = b"\"alpha\"\n\"".to_vec();
    huge.resize(huge.len() + m3::text::MAX_LINE_BYTES + 10, b'a');
    huge.extend(b"\"\n");
    let r = m3(&["encode", MODEL, s(&model), "--outputs", "dense"], &huge);
    failed_with(&r, "<stdin>:2: line longer than 64 MiB");
    assert_eq!(String::from_utf8_lossy(&r.stdout).lines().count(), 1);
}

#[test]
fn paths_appear_in_filesystem_errors() {
    let d = tmp("paths");
    let model = fixture("tiny-m3");
    let file = d.join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let r = m3(
        &["encode", MODEL, s(&model), "--npy-dir", s(&file)],
        b"\"x\"\n",
    );
    failed_with(&r, "plain-file");
    let r = train(&d, &file.join("out"), &["--max-steps", "1"]);
    failed_with(&r, "plain-file");
}

// ---- kill -9 at any point ----

/// Starts `m3 args` and kills it with SIGKILL after `after`.
fn kill_after(args: &[&str], after: std::time::Duration) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_m3"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let _ = child.kill(); // SIGKILL on Unix; an error only if it already ended
    child.wait().unwrap();
}

fn count_of(idx: &Path) -> u64 {
    let meta: Value =
        serde_json::from_slice(&std::fs::read(idx.join("meta.json")).unwrap()).unwrap();
    meta["count"].as_u64().unwrap()
}

#[test]
fn kill_9_during_a_qdrant_index_and_a_rerun_hold_each_passage_once() {
    let d = tmp("kill-qdrant");
    let model = fixture("tiny-m3");
    let c = corpus(&d, 300);
    let args = |idx: &Path| -> Vec<String> {
        [
            "search",
            "index",
            MODEL,
            s(&model),
            "--corpus",
            s(&c),
            "--index",
            s(idx),
        ]
        .map(String::from)
        .to_vec()
    };
    let whole = d.join("whole");
    let t0 = std::time::Instant::now();
    ok(&m3(
        &args(&whole).iter().map(String::as_str).collect::<Vec<_>>(),
        b"",
    ));
    let full = t0.elapsed();
    let held = |idx: &Path| {
        m3::retrieval::qdrant::QdrantIndex::open(idx)
            .unwrap()
            .count()
            .unwrap()
    };
    assert_eq!(held(&whole), 300);
    let results = |idx: &Path| -> Vec<common::Ranked> {
        let out = query(&model, idx);
        ok(&out);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| common::ranked(&serde_json::from_str(l).unwrap()))
            .collect()
    };
    let want = results(&whole);
    let mut cut = 0;
    for k in 0..5 {
        let idx = d.join(format!("idx{k}"));
        let a = args(&idx);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        kill_after(&a, full.mul_f64((k as f64 + 0.5) / 5.0));
        if idx.join("m3-qdrant.json").exists() {
            cut += usize::from(held(&idx) < 300);
        }
        ok(&m3(&a, b""));
        assert_eq!(held(&idx), 300, "after kill {k} and a rerun");
        for (a, b) in results(&idx).iter().zip(&want) {
            common::assert_same(a, b, &format!("after kill {k} and a rerun"));
        }
    }
    assert!(cut > 0, "no kill landed before the index was complete");
}

#[test]
fn kill_9_during_indexing_or_training_leaves_a_usable_index_and_a_resumable_run() {
    let d = tmp("kill");
    let model = fixture("tiny-m3");
    let idx = d.join("idx");
    let old = corpus(&d, 300);
    ok(&index(&model, &old, &idx));
    std::fs::create_dir_all(d.join("n")).unwrap();
    let new = corpus(&d.join("n"), 200);
    let t0 = std::time::Instant::now();
    let args = [
        "search",
        "index",
        MODEL,
        s(&model),
        "--corpus",
        s(&new),
        "--index",
        s(&idx),
        "--engine",
        "m3",
    ];
    ok(&m3(&args, b""));
    let full = t0.elapsed();
    let mut interrupted = 0;
    for k in 0..8 {
        ok(&index(&model, &old, &idx));
        kill_after(&args, full.mul_f64((k as f64 + 0.5) / 8.0));
        ok(&query(&model, &idx));
        let n = count_of(&idx);
        assert!(n == 300 || n == 200, "an index of {n} passages");
        interrupted += usize::from(n == 300);
    }
    assert!(interrupted > 0, "no kill landed before the build finished");
    ok(&m3(&args, b""));
    assert_eq!(count_of(&idx), 200);
    let left: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("m3-tmp") || n.contains("m3-old"))
        .collect();
    assert!(
        left.is_empty(),
        "leftovers after a completed build: {left:?}"
    );

    // Training with a retention limit, killed at spread-out points, then resumed.
    let out = d.join("out");
    let t0 = std::time::Instant::now();
    ok(&train(
        &d,
        &out,
        &["--max-steps", "12", "--overwrite-output-dir"],
    ));
    let full = t0.elapsed();
    let data = d.join("train.jsonl");
    let mut resumed = 0;
    for k in 0..6 {
        let _ = std::fs::remove_dir_all(&out);
        let args = [
            "train",
            MODEL,
            s(&model),
            "--data",
            s(&data),
            "--output-dir",
            s(&out),
            "--per-device-train-batch-size",
            "2",
            "--train-group-size",
            "2",
            "--save-steps",
            "1",
            "--save-total-limit",
            "1",
            "--max-steps",
            "12",
        ];
        kill_after(&args, full.mul_f64((k as f64 + 0.5) / 6.0));
        let has_checkpoint = std::fs::read_dir(&out)
            .map(|r| {
                r.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
            })
            .unwrap_or(false);
        let finished = out.join("model.safetensors").exists();
        resumed += usize::from(has_checkpoint && !finished);
        let r = if has_checkpoint {
            train(&d, &out, &["--max-steps", "12", "--resume"])
        } else {
            train(&d, &out, &["--max-steps", "12"])
        };
        ok(&r);
        assert_self_contained(&out.join("checkpoint-12"));
        assert_self_contained(&out);
    }
    assert!(resumed > 0, "no kill landed between two checkpoints");
}
