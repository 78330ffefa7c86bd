//! `m3 search --qdrant-url URL --collection NAME`: the index in a Qdrant server or cluster.
//! The refusals run everywhere; the round trip needs a real server and runs when
//! `M3_QDRANT_URL` names one (its gRPC URL, e.g. http://localhost:6334), saying it skipped
//! otherwise: it indexes the demo corpus into a new collection and into the in-process
//! engine, and checks that both answer the same queries the same way, that a rerun and a
//! resumed run hold each passage once, and that another model is refused.
#![cfg(feature = "qdrant-server")]

mod common;

use std::path::Path;

use common::{
    assert_same, demo_corpus, demo_queries, fixture, json_lines, m3, narrower_model, ranked,
    search_index, stderr, tmp,
};
use serde_json::Value;

fn model() -> String {
    fixture("tiny-m3").to_str().unwrap().to_string()
}

/// `m3 search index` into collection `name` on `url` of the corpus file `corpus`.
fn index_into(model: &str, corpus: &Path, url: &str, name: &str) -> std::process::Output {
    m3(
        &[
            "search",
            "index",
            "--model",
            model,
            "--corpus",
            corpus.to_str().unwrap(),
            "--qdrant-url",
            url,
            "--collection",
            name,
            "--qdrant-timeout",
            "20",
        ],
        b"",
    )
}

fn query(where_: &[&str], top_k: usize, input: &[u8]) -> Vec<Value> {
    let k = top_k.to_string();
    let model = model();
    let mut args = vec!["search", "query", "--model", &model, "--top-k", &k];
    args.extend_from_slice(where_);
    json_lines(&args, input)
}

#[test]
fn a_server_that_does_not_answer_is_named_and_flags_are_checked() {
    let d = tmp("qdrant-server-refuse");
    let (c, _) = demo_corpus(&d, 3, "c.jsonl");
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = index_into(&model(), &c, &url, "c");
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains(&format!("cannot reach Qdrant at {url}")),
        "{err}"
    );
    let out = m3(
        &[
            "search",
            "query",
            "--model",
            &model(),
            "--qdrant-url",
            &url,
            "--collection",
            "c",
        ],
        b"\"x\"\n",
    );
    assert!(!out.status.success() && stderr(&out).contains("cannot reach Qdrant"));
    // --qdrant-url needs --collection, and excludes --index.
    let m = model();
    let base = ["search", "query", "--model", m.as_str()];
    for extra in [
        &["--qdrant-url", url.as_str()][..],
        &[
            "--qdrant-url",
            url.as_str(),
            "--collection",
            "c",
            "--index",
            "x",
        ][..],
        &["--collection", "c"][..],
        &[][..],
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = m3(&args, b"");
        let err = stderr(&out);
        assert!(
            !out.status.success() && (err.contains("--collection") || err.contains("--index")),
            "{args:?}: {err}"
        );
    }
}

/// Deletes the test's collection however the test ends.
struct Cleanup {
    url: String,
    name: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        if let Ok(c) = qdrant_client::Qdrant::from_url(&self.url)
            .skip_compatibility_check()
            .build()
        {
            let _ = rt.block_on(c.delete_collection(&self.name));
        }
    }
}

#[test]
fn a_real_server_answers_as_the_in_process_engine_and_holds_each_passage_once() {
    let Ok(url) = std::env::var("M3_QDRANT_URL") else {
        eprintln!("skipped: set M3_QDRANT_URL to a Qdrant server's gRPC URL to run this test");
        return;
    };
    let d = tmp("qdrant-server");
    let name = format!(
        "m3-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let _cleanup = Cleanup {
        url: url.clone(),
        name: name.clone(),
    };
    let (part, _) = demo_corpus(&d, 40, "part.jsonl");
    let (full, _) = demo_corpus(&d, 120, "full.jsonl");
    let local = d.join("local");
    assert!(search_index(&fixture("tiny-m3"), &full, &local, "qdrant")
        .status
        .success());

    // Part, then the whole corpus (a resumed run), then the whole again (a rerun).
    let out = index_into(&model(), &part, &url, &name);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("indexed 40 new passages (40 held in all)"));
    let out = index_into(&model(), &full, &url, &name);
    assert!(
        stderr(&out).contains("indexed 80 new passages (120 held in all)"),
        "{}",
        stderr(&out)
    );
    let out = index_into(&model(), &full, &url, &name);
    assert!(
        stderr(&out).contains("indexed 0 new passages (120 held in all)"),
        "{}",
        stderr(&out)
    );

    let input = demo_queries(12);
    let server = [
        "--qdrant-url",
        url.as_str(),
        "--collection",
        name.as_str(),
        "--exact",
    ];
    for k in [5, 120] {
        let a = query(&server, k, &input);
        let b = query(&["--index", local.to_str().unwrap()], k, &input);
        assert_eq!(a.len(), 12);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert_same(&ranked(a), &ranked(b), &format!("query {i}, top {k}"));
        }
    }

    // A model of another width is refused, and the collection keeps what it held.
    let other = narrower_model(&d.join("other"));
    let out = index_into(other.to_str().unwrap(), &full, &url, &name);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("dense size 32 vs 16"),
        "{err}"
    );
    let out = index_into(&model(), &full, &url, &name);
    assert!(
        stderr(&out).contains("(120 held in all)"),
        "{}",
        stderr(&out)
    );
}
