//! The `m3` binary end to end on the fixture model: encode, score, search, and bad input.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Output;

use common::{fixture, m3, tmp};

use serde_json::Value;

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny-m3-golden.json")).unwrap()).unwrap()
}

const MODEL: &str = "--model";

#[test]
fn encode_writes_one_line_per_input_in_order_matching_flagembedding() {
    let g = golden();
    let recs = g["records"].as_array().unwrap();
    let mut input = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let line = if i % 2 == 0 {
            serde_json::json!({"text": r["text"], "id": i})
        } else {
            r["text"].clone()
        };
        writeln!(input, "{line}").unwrap();
    }
    let model = fixture("tiny-m3");
    let max_len = g["max_length"].to_string();
    let out = m3(
        &[
            "encode",
            MODEL,
            model.to_str().unwrap(),
            "--outputs",
            "dense,sparse,colbert",
            "--max-length",
            &max_len,
            "--batch-tokens",
            "64",
        ],
        &input,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("were truncated"),
        "one summary warning expected: {stderr}"
    );
    assert_eq!(stderr.matches("warning").count(), 1, "{stderr}");
    let got = lines(&out);
    assert_eq!(got.len(), recs.len());
    for (i, (o, r)) in got.iter().zip(recs).enumerate() {
        if i % 2 == 0 {
            assert_eq!(o["id"], i, "line {i}");
        } else {
            assert!(o.get("id").is_none());
        }
        for (a, b) in o["dense_vecs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["dense_vecs"].as_array().unwrap())
        {
            assert!(
                (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-4,
                "dense of line {i}"
            );
        }
        let lw = o["lexical_weights"].as_object().unwrap();
        assert_eq!(
            lw.len(),
            r["lexical_weights"].as_object().unwrap().len(),
            "lexical of line {i}"
        );
        assert_eq!(
            o["colbert_vecs"].as_array().unwrap().len(),
            r["colbert_vecs"].as_array().unwrap().len()
        );
    }
}

/// A `.npy` file's shape and raw little-endian data (descr checked).
fn read_npy(path: &Path, descr: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert_eq!((10 + len) % 64, 0, "header not 64-byte aligned: {header}");
    assert!(header.contains(&format!("'descr': '{descr}'")), "{header}");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().unwrap())
        .collect();
    (shape, bytes[10 + len..].to_vec())
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn npy_output_holds_exactly_what_jsonl_holds() {
    let g = golden();
    let recs = g["records"].as_array().unwrap();
    let mut input = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        writeln!(input, "{}", serde_json::json!({"text": r["text"], "id": i})).unwrap();
    }
    let model = fixture("tiny-m3");
    let outputs = ["--outputs", "dense,sparse,colbert"];
    let mut args = vec!["encode", MODEL, model.to_str().unwrap()];
    args.extend(outputs);
    let json = m3(&args, &input);
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let json = lines(&json);
    let d = tmp("npy");
    let dir = d.join("out");
    let mut args = vec!["encode", MODEL, model.to_str().unwrap(), "--npy-dir"];
    args.push(dir.to_str().unwrap());
    args.extend(outputs);
    let out = m3(&args, &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let n = recs.len();
    let (shape, dense) = read_npy(&dir.join("dense.npy"), "<f4");
    assert_eq!(shape, [n, 32]);
    let dense = f32s(&dense);
    let (shape, colbert) = read_npy(&dir.join("colbert.npy"), "<f4");
    let colbert = f32s(&colbert);
    let (cshape, coff) = read_npy(&dir.join("colbert_offsets.npy"), "<i8");
    let coff = i64s(&coff);
    assert_eq!(cshape, [n + 1]);
    assert_eq!(shape, [*coff.last().unwrap() as usize, 32]);
    let (_, lid) = read_npy(&dir.join("lexical_ids.npy"), "<u4");
    let lid: Vec<u32> = lid
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (_, lw) = read_npy(&dir.join("lexical_weights.npy"), "<f4");
    let lw = f32s(&lw);
    let (_, loff) = read_npy(&dir.join("lexical_offsets.npy"), "<i8");
    let loff = i64s(&loff);
    let ids = std::fs::read_to_string(dir.join("ids.jsonl")).unwrap();
    let ids: Vec<Value> = ids
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ids.len(), n);
    for (i, j) in json.iter().enumerate() {
        assert_eq!(ids[i], j["id"]);
        let want: Vec<f32> = j["dense_vecs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&dense[i * 32..(i + 1) * 32], &want[..], "text {i} dense");
        let rows = j["colbert_vecs"].as_array().unwrap();
        assert_eq!(
            coff[i + 1] - coff[i],
            rows.len() as i64,
            "text {i} colbert rows"
        );
        for (k, row) in rows.iter().enumerate() {
            let want: Vec<f32> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let at = (coff[i] as usize + k) * 32;
            assert_eq!(&colbert[at..at + 32], &want[..], "text {i} colbert row {k}");
        }
        let lex = j["lexical_weights"].as_object().unwrap();
        let (a, b) = (loff[i] as usize, loff[i + 1] as usize);
        assert_eq!(b - a, lex.len(), "text {i} lexical entries");
        for (id, w) in lid[a..b].iter().zip(&lw[a..b]) {
            assert_eq!(
                lex[&id.to_string()].as_f64().unwrap() as f32,
                *w,
                "text {i} token {id}"
            );
        }
    }
    // --npy-dir and --output are one or the other.
    let mut args = args.clone();
    args.extend(["--output", "x.jsonl"]);
    let out = m3(&args, &input);
    assert!(!out.status.success());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_bad_line_stops_with_its_number_after_completing_the_lines_before() {
    let model = fixture("tiny-m3");
    for (input, what) in [
        (
            &b"\"one\"\n{\"text\": \"two\"}\n{not json\n\"four\"\n"[..],
            "malformed JSON",
        ),
        (
            &b"\"one\"\n{\"text\": \"two\"}\n\"\xff\xfe\"\n\"four\"\n"[..],
            "invalid UTF-8",
        ),
        (
            &b"\"one\"\n{\"text\": \"two\"}\n{\"id\": 3}\n\"four\"\n"[..],
            "no \"text\"",
        ),
    ] {
        let out = m3(&["encode", MODEL, model.to_str().unwrap()], input);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("<stdin>:3") && err.contains(what), "{err}");
        let got = lines(&out);
        assert_eq!(got.len(), 2, "lines before the bad one are complete");
        assert!(got
            .iter()
            .all(|l| l["dense_vecs"].as_array().unwrap().len() == 32));
    }
}

#[test]
fn an_empty_text_gives_a_valid_record() {
    let out = m3(
        &["encode", MODEL, fixture("tiny-m3").to_str().unwrap()],
        b"\"\"\n",
    );
    assert!(out.status.success());
    let got = lines(&out);
    assert_eq!(got[0]["dense_vecs"].as_array().unwrap().len(), 32);
    assert!(got[0]["lexical_weights"].as_object().unwrap().is_empty());
}

#[test]
fn asking_for_a_missing_head_is_an_error() {
    let dir = tmp("nohead");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture("tiny-m3").join(f), dir.join(f)).unwrap();
    }
    let out = m3(
        &[
            "encode",
            MODEL,
            dir.to_str().unwrap(),
            "--outputs",
            "colbert",
        ],
        b"\"x\"\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("colbert_linear"));
    let out = m3(
        &["encode", MODEL, dir.to_str().unwrap(), "--outputs", "dense"],
        b"\"x\"\n",
    );
    assert!(out.status.success());
}

#[test]
fn score_matches_flagembedding_compute_score() {
    let g = golden();
    let s = &g["score"];
    let mut input = Vec::new();
    for p in s["pairs"].as_array().unwrap() {
        writeln!(
            input,
            "{}",
            serde_json::json!({"query": p["query"], "passage": p["passage"]})
        )
        .unwrap();
    }
    let out = m3(
        &[
            "score",
            MODEL,
            fixture("tiny-m3").to_str().unwrap(),
            "--input",
            "-",
            "--weights",
            "0.4,0.2,0.4",
            "--query-max-length",
            &s["query_max_length"].to_string(),
            "--passage-max-length",
            &s["passage_max_length"].to_string(),
        ],
        &input,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = lines(&out);
    for (i, (o, p)) in got.iter().zip(s["pairs"].as_array().unwrap()).enumerate() {
        for key in [
            "dense",
            "sparse",
            "colbert",
            "sparse+dense",
            "colbert+sparse+dense",
        ] {
            let (a, b) = (o[key].as_f64().unwrap(), p[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                "pair {i} {key}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn search_finds_a_passage_by_its_own_text() {
    let g = golden();
    let texts: Vec<&str> = g["records"]
        .as_array()
        .unwrap()
        .iter()
        .skip(3)
        .take(20)
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    let dir = tmp("search");
    let corpus = dir.join("corpus.jsonl");
    let mut c = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        writeln!(
            c,
            "{}",
            serde_json::json!({"text": t, "id": format!("p{i}")})
        )
        .unwrap();
    }
    std::fs::write(&corpus, c).unwrap();
    let index = dir.join("index");
    let model = fixture("tiny-m3");
    let out = common::search_index(&model, &corpus, &index, "qdrant");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut q = Vec::new();
    for i in [0usize, 7, 13] {
        writeln!(q, "{}", serde_json::json!({"text": texts[i], "id": i})).unwrap();
    }
    let out = m3(
        &[
            "search",
            "query",
            MODEL,
            model.to_str().unwrap(),
            "--index",
            index.to_str().unwrap(),
            "--top-k",
            "5",
        ],
        &q,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for l in lines(&out) {
        let i = l["id"].as_u64().unwrap();
        let res = l["results"].as_array().unwrap();
        assert!(!res.is_empty() && res.len() <= 5);
        assert_eq!(res[0]["id"], format!("p{i}"), "{l}");
        let scores: Vec<f64> = res.iter().map(|r| r["score"].as_f64().unwrap()).collect();
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "ranked by hybrid score: {scores:?}"
        );
        // The hybrid is the weighted mean of the three mode scores.
        let r = &res[0];
        let want = (0.4 * r["dense"].as_f64().unwrap()
            + 0.2 * r["sparse"].as_f64().unwrap()
            + 0.4 * r["colbert"].as_f64().unwrap())
            / 1.0;
        assert!((want - r["score"].as_f64().unwrap()).abs() < 1e-5);
    }
}

#[test]
fn help_documents_every_subcommand() {
    let out = m3(&["--help"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "demo",
        "encode",
        "score",
        "search",
        "train",
        "bench",
        "selfcheck",
        "kernels",
    ] {
        assert!(text.contains(cmd), "{text}");
    }
    let out = m3(&["bench", "--help"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["make-model", "encode", "train", "memory"] {
        assert!(text.contains(cmd), "{text}");
    }
    // The memory benchmark reads the GPU's memory pool; on the CPU it says so.
    let model = fixture("tiny-m3");
    let out = m3(
        &[
            "bench",
            "memory",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        b"",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--device cuda"),
        "{err}"
    );
}

#[test]
fn train_writes_checkpoints_metrics_and_a_model_encode_loads() {
    let d = tmp("train");
    let data = d.join("train.jsonl");
    std::fs::write(
        &data,
        "{\"query\": \"capital of France\", \"pos\": [\"Paris is the capital of France.\"], \"neg\": [\"The fox jumps.\"]}\n\
         {\"query\": \"schneller Fuchs\", \"pos\": [\"Der schnelle braune Fuchs\"], \"neg\": [\"Paris\"]}\n",
    )
    .unwrap();
    let out_dir = d.join("out");
    let metrics = d.join("metrics.jsonl");
    let model = fixture("tiny-m3");
    let args = [
        "train",
        MODEL,
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
        "--per-device-train-batch-size",
        "2",
        "--train-group-size",
        "2",
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--metrics",
        metrics.to_str().unwrap(),
        "--learning-rate",
        "1e-3",
    ];
    let out = m3(&args, b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Vec<Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(m.len(), 2);
    assert!(m[1]["loss"].as_f64().unwrap().is_finite());
    for c in ["checkpoint-1", "checkpoint-2"] {
        for f in [
            "model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
            "tokenizer.json",
        ] {
            assert!(out_dir.join(c).join(f).exists(), "{c}/{f}");
        }
    }
    // The final model in the output directory encodes with all three outputs.
    let out = m3(
        &[
            "encode",
            MODEL,
            out_dir.to_str().unwrap(),
            "--outputs",
            "dense,sparse,colbert",
        ],
        b"{\"text\": \"Paris\"}\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines(&out)[0]["dense_vecs"].as_array().unwrap().len(), 32);
    // Training again into the same directory needs --resume or --overwrite-output-dir.
    let out = m3(&args, b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--overwrite-output-dir"),
        "{err}"
    );
    // A bad record is an error naming its file and line, before any step.
    std::fs::write(
        &data,
        "{\"query\": \"q\", \"pos\": [\"p\"]}\n{\"query\": \"q\"}\n",
    )
    .unwrap();
    let mut args = args.to_vec();
    args.push("--overwrite-output-dir");
    let out = m3(&args, b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("train.jsonl:2"),
        "{err}"
    );
    // bf16 compute is the GPU's; on the CPU it is an error naming the flag.
    args.extend(["--compute-dtype", "bf16", "--device", "cpu"]);
    let out = m3(&args, b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--compute-dtype bf16"),
        "{err}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_demo_improves_every_retrieval_mode() {
    let out = m3(&["demo", "--steps", "300"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in ["dense", "sparse", "colbert", "hybrid"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(mode))
            .unwrap_or_else(|| panic!("no {mode} row in {text}"));
        let v: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        // recall@1 before, after; recall@10 before, after
        assert_eq!(v.len(), 4, "{line}");
        assert!(v[1] > v[0] && v[3] > v[2], "{mode} did not improve: {line}");
    }
}

/// Three training records (a global batch of two ranks leaves one short: padding is used).
fn three_records(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("train.jsonl");
    std::fs::write(
        &data,
        "{\"query\": \"capital of France\", \"pos\": [\"Paris is the capital of France.\"], \"neg\": [\"The fox jumps.\"]}\n\
         {\"query\": \"schneller Fuchs\", \"pos\": [\"Der schnelle braune Fuchs\"], \"neg\": [\"Paris\"]}\n\
         {\"query\": \"Everest\", \"pos\": [\"Mount Everest is 8849 metres high.\"], \"neg\": [\"Hamlet\"]}\n",
    )
    .unwrap();
    data
}

#[test]
fn train_with_two_ranks_writes_one_model_and_refuses_resuming_with_another_world() {
    let d = tmp("train-ranks");
    let data = three_records(&d);
    let out_dir = d.join("out");
    let metrics = d.join("metrics.jsonl");
    let model = fixture("tiny-m3");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            MODEL,
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            out_dir.to_str().unwrap(),
            "--per-device-train-batch-size",
            "1",
            "--train-group-size",
            "2",
            "--save-steps",
            "1",
            "--metrics",
            metrics.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        m3(&args, b"")
    };
    let out = run(&[
        "--nproc-per-node",
        "2",
        "--negatives-cross-device",
        "--max-steps",
        "2",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    // One metrics line per step (rank 0 writes), checkpoints and the final model.
    let m: Vec<Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));
    for f in ["checkpoint-2/trainer_state.json", "model.safetensors"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    let out = run(&["--resume", "--max-steps", "2"]);
    let err = common::stderr(&out);
    assert!(!out.status.success() && err.contains("world_size"), "{err}");
    let out = run(&[
        "--resume",
        "--nproc-per-node",
        "2",
        "--negatives-cross-device",
        "--max-steps",
        "2",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    std::fs::remove_dir_all(&d).unwrap();
}

/// A free loopback port (bound, read, released: a launcher picks one the same way).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn train_as_processes_under_torchrun_variables_matches_the_in_process_ranks() {
    let d = tmp("train-procs");
    let data = three_records(&d);
    let model = fixture("tiny-m3");
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            MODEL,
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--per-device-train-batch-size",
            "1",
            "--train-group-size",
            "2",
            "--max-steps",
            "3",
            "--negatives-cross-device",
            "--collective-timeout",
            "60",
        ]
        .map(String::from)
        .to_vec()
    };
    let threads = d.join("threads");
    let mut a = args(&threads);
    a.extend(["--nproc-per-node".into(), "2".into()]);
    let out = m3(&a.iter().map(String::as_str).collect::<Vec<_>>(), b"");
    assert!(out.status.success(), "{}", common::stderr(&out));
    // The same run as two processes joined at MASTER_ADDR:MASTER_PORT.
    let procs = d.join("procs");
    let port = free_port().to_string();
    let spawn = |rank: &str, extra: &[&str]| {
        let mut a = args(&procs);
        a.extend(extra.iter().map(|s| s.to_string()));
        std::process::Command::new(env!("CARGO_BIN_EXE_m3"))
            .args(&a)
            .env("RANK", rank)
            .env("LOCAL_RANK", rank)
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (r0, r1) = (spawn("0", &[]), spawn("1", &[]));
    for (r, c) in [("0", r0), ("1", r1)] {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "rank {r}: {}", common::stderr(&out));
    }
    // Both sum the ranks' gradients in rank order: the same weights to the bit.
    let w = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(w(&threads) == w(&procs), "the process run's model differs");
    // A rank that fails stops the other, which names it.
    let port = free_port().to_string();
    let spawn = |rank: &str, model: &str| {
        let mut a = args(&d.join("fail"));
        a[2] = model.to_string();
        std::process::Command::new(env!("CARGO_BIN_EXE_m3"))
            .args(&a)
            .env("RANK", rank)
            .env("WORLD_SIZE", "2")
            .env("MASTER_PORT", &port)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let missing = d.join("no-such-model");
    let (r0, r1) = (
        spawn("0", model.to_str().unwrap()),
        spawn("1", missing.to_str().unwrap()),
    );
    let (o0, o1) = (
        r0.wait_with_output().unwrap(),
        r1.wait_with_output().unwrap(),
    );
    let (e0, e1) = (common::stderr(&o0), common::stderr(&o1));
    assert!(!o1.status.success() && e1.contains("no-such-model"), "{e1}");
    assert!(
        !o0.status.success() && e0.contains("rank 1 stopped"),
        "{e0}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn train_refuses_nproc_per_node_under_a_launcher() {
    let d = tmp("train-world");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_m3"))
        .args([
            "train",
            MODEL,
            fixture("tiny-m3").to_str().unwrap(),
            "--data",
            "x.jsonl",
        ])
        .args(["--output-dir", d.join("out").to_str().unwrap()])
        .args(["--nproc-per-node", "4"])
        .env("WORLD_SIZE", "4")
        .env("RANK", "1")
        .output()
        .unwrap();
    let err = common::stderr(&out);
    assert!(
        !out.status.success() && err.contains("WORLD_SIZE=4") && err.contains("--nproc-per-node 4"),
        "{err}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn train_with_nccl_on_a_machine_without_it_says_so() {
    let d = tmp("train-nccl");
    let data = d.join("train.jsonl");
    std::fs::write(
        &data,
        "{\"query\": \"q\", \"pos\": [\"p\"], \"neg\": [\"n\"]}\n{\"query\": \"r\", \"pos\": [\"s\"], \"neg\": [\"t\"]}\n",
    )
    .unwrap();
    let out = m3(
        &[
            "train",
            MODEL,
            fixture("tiny-m3").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            d.join("out").to_str().unwrap(),
            "--device",
            "cpu",
            "--ddp-backend",
            "nccl",
        ],
        b"",
    );
    let err = common::stderr(&out);
    assert!(
        !out.status.success() && err.contains("--ddp-backend nccl"),
        "{err}"
    );
    assert!(!d.join("out/model.safetensors").exists());
    std::fs::remove_dir_all(&d).unwrap();
}

/// A closed reader (`m3 ... | head`) ends the run quietly with status 141, as `cat` would
/// be ended by SIGPIPE, for JSON lines (`encode`) and for table lines (`selfcheck`).
#[test]
fn a_closed_stdout_pipe_ends_the_run_quietly_with_status_141() {
    let model = fixture("tiny-m3");
    let runs: [(&[&str], &[u8]); 2] = [
        (
            &["encode", MODEL, model.to_str().unwrap()],
            b"\"a\"\n\"b\"\n",
        ),
        (&["selfcheck", "--device", "cpu"], b""),
    ];
    for (args, input) in runs {
        // The reader is gone before the process starts, so its first write fails.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_m3"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("error"),
            "{args:?}: {err}"
        );
    }
}
