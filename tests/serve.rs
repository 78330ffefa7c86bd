//! `m3 serve` over real HTTP on loopback: every route, every refusal, concurrent requests
//! whose answers equal `m3 encode`'s, 429 under overload, graceful shutdown with requests
//! in flight, and the real Python clients (`openai`, `huggingface_hub`) where installed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{fixture, m3};
use serde_json::{json, Value};

/// A running `m3 serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    // The child is waited for by `Drop` (or `terminate`), which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn start(extra: &[&str]) -> Server {
        let model = fixture("tiny-m3");
        let mut child = Command::new(env!("CARGO_BIN_EXE_m3"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if err.read_line(&mut line).unwrap_or(0) == 0 {
                let status = child.wait().unwrap();
                panic!("server exited before listening: {status}");
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                let url = rest.split_whitespace().next().unwrap().to_string();
                // Keep draining stderr so the server never blocks on it.
                std::thread::spawn(move || for _ in err.lines() {});
                return Server { child, url };
            }
        }
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = ureq::post(&format!("{}{path}", self.url)).send_json(body);
        match r {
            Ok(resp) => (resp.status(), resp.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&format!("{}{path}", self.url)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TEXTS: [&str; 6] = [
    "What is BGE M3?",
    "Paris is the capital of France.",
    "Der schnelle braune Fuchs springt.",
    "",
    "alpha beta gamma delta alpha beta",
    "lexical matching with sparse weights",
];

/// `m3 encode`'s JSONL output for `texts` (all three outputs).
fn offline(texts: &[&str]) -> Vec<Value> {
    let input: String = texts
        .iter()
        .map(|t| serde_json::to_string(t).unwrap() + "\n")
        .collect();
    let model = fixture("tiny-m3");
    let out = m3(
        &[
            "encode",
            "--model",
            model.to_str().unwrap(),
            "--outputs",
            "dense,sparse,colbert",
        ],
        input.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_route_answers_in_its_peers_shape_and_equals_m3_encode() {
    let s = Server::start(&[]);
    let want = offline(&TEXTS);
    let (code, body) = s.post(
        "/encode",
        json!({"inputs": TEXTS, "return_dense": true, "return_sparse": true, "return_colbert_vecs": true}),
    );
    assert_eq!(code, 200, "{body}");
    for (i, w) in want.iter().enumerate() {
        assert_eq!(body["dense_vecs"][i], w["dense_vecs"], "dense of text {i}");
        assert_eq!(
            body["lexical_weights"][i], w["lexical_weights"],
            "lexical of text {i}"
        );
        assert_eq!(
            body["colbert_vecs"][i], w["colbert_vecs"],
            "colbert of text {i}"
        );
    }
    // TEI /embed and /embed_sparse.
    let (code, dense) = s.post("/embed", json!({"inputs": TEXTS}));
    assert_eq!(code, 200);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(dense[i], w["dense_vecs"]);
    }
    let (_, one) = s.post("/embed", json!({"inputs": TEXTS[1]}));
    assert_eq!(one[0], want[1]["dense_vecs"]);
    let (code, sparse) = s.post("/embed_sparse", json!({"inputs": TEXTS}));
    assert_eq!(code, 200);
    for (i, w) in want.iter().enumerate() {
        let got: serde_json::Map<String, Value> = sparse[i]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["index"].to_string(), e["value"].clone()))
            .collect();
        assert_eq!(
            Value::Object(got),
            w["lexical_weights"],
            "sparse of text {i}"
        );
    }
    // OpenAI, floats and base64.
    let (code, oa) = s.post("/v1/embeddings", json!({"input": TEXTS, "model": "bge-m3"}));
    assert_eq!(code, 200, "{oa}");
    assert_eq!(oa["object"], "list");
    assert_eq!(oa["model"], "bge-m3");
    assert!(oa["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(oa["data"][i]["index"], i);
        let got: Vec<f32> = serde_json::from_value(oa["data"][i]["embedding"].clone()).unwrap();
        let exp: Vec<f32> = serde_json::from_value(w["dense_vecs"].clone()).unwrap();
        assert_eq!(got, exp);
    }
    let (_, b64) = s.post(
        "/v1/embeddings",
        json!({"input": TEXTS[0], "encoding_format": "base64"}),
    );
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let got: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let exp: Vec<f32> = serde_json::from_value(want[0]["dense_vecs"].clone()).unwrap();
    assert_eq!(got, exp);
    // Token ids in: the same as the text they tokenize to.
    let (_, tok) = s.post(
        "/tokenize",
        json!({"inputs": TEXTS[1], "add_special_tokens": false}),
    );
    let ids: Vec<u64> = tok[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert!(!ids.is_empty());
    let piece = &tok[0][0];
    let (a, b) = (
        piece["start"].as_u64().unwrap(),
        piece["stop"].as_u64().unwrap(),
    );
    assert!(a < b && b as usize <= TEXTS[1].len(), "{piece}");
    let (_, by_ids) = s.post("/v1/embeddings", json!({"input": ids}));
    let got: Vec<f32> = serde_json::from_value(by_ids["data"][0]["embedding"].clone()).unwrap();
    let exp: Vec<f32> = serde_json::from_value(want[1]["dense_vecs"].clone()).unwrap();
    assert_eq!(got, exp);
    let (_, with_specials) = s.post("/tokenize", json!({"inputs": [TEXTS[1]]}));
    let t = with_specials[0].as_array().unwrap();
    assert_eq!(t.len(), ids.len() + 2);
    assert!(t[0]["special"].as_bool().unwrap() && t.last().unwrap()["special"].as_bool().unwrap());
    // /score equals m3 score's formulas on the same embeddings; /rerank ranks by the hybrid.
    let (code, sc) = s.post(
        "/score",
        json!({"pairs": [[TEXTS[0], TEXTS[1]], [TEXTS[4], TEXTS[4]]]}),
    );
    assert_eq!(code, 200, "{sc}");
    for k in [
        "dense",
        "sparse",
        "colbert",
        "sparse+dense",
        "colbert+sparse+dense",
    ] {
        assert_eq!(sc[k].as_array().unwrap().len(), 2, "{k}");
    }
    let d: f64 = sc["dense"][1].as_f64().unwrap();
    assert!((d - 1.0).abs() < 1e-5, "a text against itself: {d}");
    let (code, rr) = s.post(
        "/rerank",
        json!({"query": TEXTS[4], "texts": [TEXTS[1], TEXTS[4], TEXTS[2]], "return_text": true}),
    );
    assert_eq!(code, 200, "{rr}");
    assert_eq!(rr[0]["index"], 1, "{rr}");
    assert_eq!(rr[0]["text"], TEXTS[4]);
    let scores: Vec<f64> = rr
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    // GET routes.
    assert_eq!(s.get("/health").0, 200);
    let (code, info) = s.get("/info");
    assert_eq!(code, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["dense_dim"], exp.len());
    assert_eq!(info["max_client_batch_size"], 32);
    let (code, metrics) = s.get("/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("m3_requests_total{route=\"/encode\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("m3_request_duration_seconds_count"),
        "{metrics}"
    );
}

#[test]
fn bad_requests_get_4xx_json_naming_the_field() {
    let s = Server::start(&[
        "--max-client-batch-size",
        "4",
        "--max-input-length",
        "16",
        "--payload-limit",
        "4096",
    ]);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("/embed", json!({"inputs": []}), 422, "cannot be empty"),
        ("/embed", json!({"inputz": "x"}), 422, "inputs"),
        (
            "/embed",
            json!({"inputs": ["a", "b", "c", "d", "e"]}),
            413,
            "batch size 5 > maximum allowed batch size 4",
        ),
        (
            "/embed",
            json!({"inputs": ["short", "alpha beta gamma delta alpha beta gamma delta alpha beta gamma delta"]}),
            413,
            "inputs[1] is longer than 16 tokens",
        ),
        (
            "/embed",
            json!({"inputs": "x", "normalize": false}),
            422,
            "normalize",
        ),
        (
            "/embed",
            json!({"inputs": "x", "truncation_direction": "Left"}),
            422,
            "truncation_direction",
        ),
        (
            "/encode",
            json!({"inputs": "x", "return_dense": false}),
            422,
            "at least one",
        ),
        (
            "/encode",
            json!({"inputs": "x", "max_length": 1}),
            422,
            "max_length",
        ),
        (
            "/score",
            json!({"pairs": [["q", "p"]], "weights": [0, 0, 0]}),
            422,
            "weights",
        ),
        ("/search", json!({"inputs": "x"}), 404, "--index"),
        (
            "/embed",
            json!({"inputs": "x".repeat(5000)}),
            413,
            "payload-limit",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (code, v) = s.post(path, body.clone());
        assert_eq!(code, status, "{path} {body}: {v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: not a JSON error: {v}"));
        assert!(msg.contains(needle), "{path}: {msg:?} lacks {needle:?}");
    }
    // A too long text is cut when asked to.
    let (code, _) = s.post(
        "/embed",
        json!({"inputs": "alpha beta gamma delta alpha beta gamma delta alpha beta gamma delta", "truncate": true}),
    );
    assert_eq!(code, 200);
    // OpenAI's route answers in OpenAI's error shape.
    for (body, param) in [
        (json!({"input": "x", "dimensions": 7}), "dimensions"),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"input": [4_000_000_000u64]}), "input"),
    ] {
        let (code, v) = s.post("/v1/embeddings", body);
        assert_eq!(code, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // Not a route.
    assert_eq!(s.get("/nope").0, 404);
    // The server is still fine.
    assert_eq!(s.post("/embed", json!({"inputs": "ok"})).0, 200);
}

/// `a` and `b` have the same structure and their numbers differ by at most `tol` (relative
/// to the larger magnitude, at least 1).
fn close(a: &Value, b: &Value, tol: f64) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= tol * x.abs().max(y.abs()).max(1.0),
                "{x} vs {y}"
            );
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).for_each(|(x, y)| close(x, y, tol));
        }
        (Value::Object(x), Value::Object(y)) => {
            // JSON objects are unordered (serde_json keeps insertion order here).
            let mut kx: Vec<&String> = x.keys().collect();
            let mut ky: Vec<&String> = y.keys().collect();
            kx.sort();
            ky.sort();
            assert_eq!(kx, ky);
            kx.iter().for_each(|k| close(&x[*k], &y[*k], tol));
        }
        _ => assert_eq!(a, b),
    }
}

#[test]
fn concurrent_requests_are_batched_and_each_gets_its_own_answer() {
    let s = Server::start(&[]);
    let want = offline(&TEXTS);
    let url = s.url.clone();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let url = url.clone();
            let want = want.clone();
            std::thread::spawn(move || {
                for k in 0..4 {
                    let i = (t + k) % TEXTS.len();
                    let j = (t * 3 + k) % TEXTS.len();
                    let r: Value = ureq::post(&format!("{url}/encode"))
                        .send_json(json!({"inputs": [TEXTS[i], TEXTS[j]], "return_sparse": true}))
                        .unwrap()
                        .into_json()
                        .unwrap();
                    // Rounds mix other requests' texts, and the CPU GEMM's blocking follows
                    // the row count, so values agree to rounding, not to the bit.
                    close(&r["dense_vecs"][0], &want[i]["dense_vecs"], 1e-6);
                    close(&r["dense_vecs"][1], &want[j]["dense_vecs"], 1e-6);
                    close(&r["lexical_weights"][1], &want[j]["lexical_weights"], 1e-5);
                    assert!(r.get("colbert_vecs").is_none());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (_, m) = s.get("/metrics");
    assert!(
        m.contains("m3_requests_total{route=\"/encode\",status=\"200\"} 32"),
        "{m}"
    );
}

/// A request big enough to keep the tiny model busy for a while.
fn heavy() -> Value {
    let long: String = std::iter::repeat_n("alpha beta gamma delta ", 120).collect();
    json!({"inputs": vec![long; 32], "return_colbert_vecs": true})
}

#[test]
fn overload_gets_429_and_shutdown_finishes_requests_in_flight() {
    let s = Server::start(&["--max-concurrent-requests", "1"]);
    let mut seen_429 = false;
    for _attempt in 0..5 {
        let url = s.url.clone();
        let codes: Vec<u16> = (0..12)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || {
                    match ureq::post(&format!("{url}/encode")).send_json(heavy()) {
                        Ok(r) => r.status(),
                        Err(ureq::Error::Status(c, r)) => {
                            let v: Value = r.into_json().unwrap();
                            assert_eq!(v["error_type"], "overloaded", "{v}");
                            c
                        }
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(codes.iter().all(|&c| c == 200 || c == 429), "{codes:?}");
        assert!(codes.contains(&200), "{codes:?}");
        if codes.contains(&429) {
            seen_429 = true;
            break;
        }
    }
    assert!(
        seen_429,
        "12 concurrent heavy requests never exceeded a limit of 1"
    );
    drop(s);

    // SIGTERM while requests are in flight: each started request completes, the process
    // exits 0.
    let mut s = Server::start(&[]);
    let url = s.url.clone();
    let inflight: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                match ureq::post(&format!("{url}/encode")).send_json(heavy()) {
                    Ok(r) => Ok(r.status()),
                    // A request that had not connected yet when the listener closed.
                    Err(ureq::Error::Transport(t)) => Err(Some(t.to_string())),
                    Err(ureq::Error::Status(c, _)) => panic!("a request in flight got HTTP {c}"),
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let status = s.terminate();
    let mut ok = 0;
    for t in inflight {
        match t.join().unwrap() {
            Ok(code) => {
                assert_eq!(code, 200);
                ok += 1;
            }
            Err(Some(transport)) => eprintln!("not connected before shutdown: {transport}"),
            Err(None) => unreachable!(),
        }
    }
    assert!(status.success(), "exit status {status}");
    assert!(ok > 0, "no request was in flight at SIGTERM");
}

#[test]
fn search_over_an_index_matches_m3_search_query() {
    let d = common::tmp("serve-search");
    let corpus = d.join("corpus.jsonl");
    let lines: String = TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": format!("p{i}"), "text": t}).to_string() + "\n")
        .collect();
    std::fs::write(&corpus, lines).unwrap();
    let idx = d.join("idx");
    let model = fixture("tiny-m3");
    let out = common::search_index(&model, &corpus, &idx, "qdrant");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = m3(
        &[
            "search",
            "query",
            "--model",
            model.to_str().unwrap(),
            "--index",
            idx.to_str().unwrap(),
            "--top-k",
            "3",
        ],
        format!("{}\n", serde_json::to_string(TEXTS[2]).unwrap()).as_bytes(),
    );
    let want: Value =
        serde_json::from_slice(q.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let s = Server::start(&["--index", idx.to_str().unwrap()]);
    let (code, got) = s.post("/search", json!({"inputs": TEXTS[2], "top_k": 3}));
    assert_eq!(code, 200, "{got}");
    assert_eq!(got[0], want["results"], "server vs m3 search query");
    assert_eq!(got[0][0]["id"], "p2");
}

/// The real third-party clients: `openai`'s `embeddings.create` and `huggingface_hub`'s
/// `InferenceClient.feature_extraction`. Skips where python3 lacks them, unless
/// `M3_REQUIRE_PY_CLIENTS=1` (CI installs them).
#[test]
fn the_openai_and_huggingface_clients_work_unchanged() {
    let have = Command::new("python3")
        .args(["-c", "import openai, huggingface_hub"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var("M3_REQUIRE_PY_CLIENTS").is_err(),
            "M3_REQUIRE_PY_CLIENTS is set but python3 cannot import openai and huggingface_hub"
        );
        eprintln!("skipping: pip install openai huggingface_hub to run this test");
        return;
    }
    let s = Server::start(&[]);
    let want = offline(&TEXTS[..3]);
    let script = r#"
import json, sys
from openai import OpenAI
from huggingface_hub import InferenceClient
url, texts = sys.argv[1], json.loads(sys.argv[2])
oa = OpenAI(base_url=url + "/v1", api_key="unused")
r = oa.embeddings.create(model="bge-m3", input=texts)
hf = InferenceClient(model=url)
fe = [hf.feature_extraction(t).tolist() for t in texts]
print(json.dumps({"openai": [d.embedding for d in r.data], "hf": fe, "tokens": r.usage.prompt_tokens}))
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &s.url,
            &serde_json::to_string(&TEXTS[..3]).unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (i, w) in want.iter().enumerate() {
        let exp: Vec<f32> = serde_json::from_value(w["dense_vecs"].clone()).unwrap();
        let oa: Vec<f32> = serde_json::from_value(v["openai"][i].clone()).unwrap();
        assert_eq!(oa, exp, "openai client, text {i}");
        // feature_extraction returns [1, D] for one text.
        let hf: Vec<f32> = serde_json::from_value(v["hf"][i][0].clone())
            .or_else(|_| serde_json::from_value(v["hf"][i].clone()))
            .unwrap();
        assert_eq!(hf, exp, "huggingface_hub client, text {i}");
    }
    assert!(v["tokens"].as_u64().unwrap() > 0);
}
