//! `m3 search` through Qdrant's in-process engine (the default) against m3's own index and
//! a brute-force hybrid computed with `m3::score` on the model's own vectors; resuming an
//! interrupted index; refusals.

mod common;

use std::path::Path;

use common::{
    assert_same, demo_corpus, demo_queries, fixture, json_lines, m3, narrower_model, ranked,
    search_index, stderr, tmp, Ranked,
};
use m3::backend::cpu::Cpu;
use m3::model::embedder::{Embedder, Embedding, EncodeOptions};
use m3::retrieval::qdrant::QdrantIndex;
use m3::score::{self, Weights};
use m3::DType;
use serde_json::Value;

const MODEL: &str = "--model";

/// The first 12 demo queries' texts.
fn queries() -> Vec<String> {
    String::from_utf8(demo_queries(12))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .into()
        })
        .collect()
}

fn query(index: &Path, top_k: usize) -> Vec<Value> {
    let (k, model) = (top_k.to_string(), fixture("tiny-m3"));
    let args = [
        "search",
        "query",
        MODEL,
        model.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "--top-k",
        &k,
    ];
    json_lines(&args, &demo_queries(12))
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", stderr(out));
}

fn encode(texts: &[&str]) -> Vec<Embedding> {
    let model = Embedder::load(&Cpu, &fixture("tiny-m3"), DType::F32).unwrap();
    let opts = EncodeOptions::all_outputs(512, 16384);
    model
        .encode(&Cpu, texts, &opts, &mut |_| {})
        .unwrap()
        .embeddings
}

/// SPEC §4 by brute force: every passage scored, candidates = dense top-k ∪ the lexical
/// top-k of the passages sharing a token, ranked by the weighted hybrid, ties by position.
fn brute_force(q: &Embedding, passages: &[Embedding], ids: &[String], k: usize) -> Ranked {
    let (qd, ql, qc) = (
        q.dense.as_ref().unwrap(),
        q.lexical.as_ref().unwrap(),
        q.colbert.as_ref().unwrap(),
    );
    let dense: Vec<f32> = passages
        .iter()
        .map(|p| score::dense(qd, p.dense.as_ref().unwrap()))
        .collect();
    let lexical: Vec<f32> = passages
        .iter()
        .map(|p| score::lexical(ql, p.lexical.as_ref().unwrap()))
        .collect();
    let mut cand: Vec<usize> = score::top_k(&dense, k);
    cand.extend(
        score::top_k(&lexical, k)
            .into_iter()
            .filter(|&p| lexical[p] > 0.0),
    );
    cand.sort_unstable();
    cand.dedup();
    let mut hits: Vec<(usize, m3::score::PairScores)> = cand
        .into_iter()
        .map(|p| {
            let c = score::colbert(qc, passages[p].colbert.as_ref().unwrap());
            (
                p,
                score::combine(dense[p], lexical[p], c, Weights::default()),
            )
        })
        .collect();
    hits.sort_by(|a, b| b.1.all.total_cmp(&a.1.all).then(a.0.cmp(&b.0)));
    hits.truncate(k);
    hits.into_iter()
        .map(|(p, s)| (ids[p].clone(), s.all, s.dense, s.sparse, s.colbert))
        .collect()
}

#[test]
fn qdrant_answers_as_m3_s_own_index_and_the_brute_force_hybrid() {
    let d = tmp("retrieval-alike");
    let (c, rows) = demo_corpus(&d, 120, "corpus.jsonl");
    let (qi, mi) = (d.join("qdrant"), d.join("own"));
    let out = search_index(&fixture("tiny-m3"), &c, &qi, "qdrant");
    ok(&out);
    assert!(stderr(&out).contains("indexed 120 new passages (120 held in all)"));
    ok(&search_index(&fixture("tiny-m3"), &c, &mi, "m3"));
    assert_eq!(QdrantIndex::open(&qi).unwrap().count().unwrap(), 120);

    let texts: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let passages = encode(&texts);
    let qs = queries();
    let q_emb = encode(&qs.iter().map(String::as_str).collect::<Vec<_>>());
    // k = 5: the union of candidates matters; k = 120: every passage is a candidate.
    for k in [5, 120] {
        let (from_q, from_m) = (query(&qi, k), query(&mi, k));
        assert_eq!(from_q.len(), qs.len());
        for (i, (a, b)) in from_q.iter().zip(&from_m).enumerate() {
            let what = format!("query {i}, top {k}");
            assert_eq!(a["id"], i);
            assert_same(&ranked(a), &ranked(b), &what);
            assert_same(
                &ranked(a),
                &brute_force(&q_emb[i], &passages, &ids, k),
                &what,
            );
        }
    }
}

#[test]
fn an_interrupted_index_resumes_without_duplicates_and_keeps_fields() {
    let d = tmp("retrieval-resume");
    let (part, _) = demo_corpus(&d, 40, "part.jsonl");
    let (full, _) = demo_corpus(&d, 90, "full.jsonl");
    let idx = d.join("idx");
    let keep = |c: &Path| {
        m3(
            &[
                "search",
                "index",
                MODEL,
                fixture("tiny-m3").to_str().unwrap(),
                "--corpus",
                c.to_str().unwrap(),
                "--index",
                idx.to_str().unwrap(),
                "--keep",
                "lang",
            ],
            b"",
        )
    };
    // A run that stopped after 40 passages, then the whole corpus, twice.
    ok(&keep(&part));
    let out = keep(&full);
    ok(&out);
    assert!(
        stderr(&out).contains("indexed 50 new passages (90 held in all)"),
        "{}",
        stderr(&out)
    );
    let out = keep(&full);
    ok(&out);
    assert!(
        stderr(&out).contains("indexed 0 new passages (90 held in all)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(QdrantIndex::open(&idx).unwrap().count().unwrap(), 90);
    // The resumed index answers as one built in a single run.
    let fresh = d.join("fresh");
    ok(&search_index(&fixture("tiny-m3"), &full, &fresh, "qdrant"));
    for (a, b) in query(&idx, 7).iter().zip(&query(&fresh, 7)) {
        assert_same(&ranked(a), &ranked(b), "resumed vs fresh");
        for r in a["results"].as_array().unwrap() {
            let lang = r["fields"]["lang"].as_str().unwrap();
            assert!(lang.starts_with('l'), "{r}");
        }
    }
    // Other kept fields than the index's, or a reserved name, are refused.
    let out = m3(
        &[
            "search",
            "index",
            MODEL,
            fixture("tiny-m3").to_str().unwrap(),
            "--corpus",
            full.to_str().unwrap(),
            "--index",
            idx.to_str().unwrap(),
        ],
        b"",
    );
    assert!(
        !out.status.success() && stderr(&out).contains("keeps the fields"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_bad_line_keeps_what_was_indexed_and_a_rerun_goes_on() {
    let d = tmp("retrieval-bad-line");
    let (full, rows) = demo_corpus(&d, 30, "full.jsonl");
    let text = std::fs::read_to_string(&full).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(20, "{\"id\": \"broken\"");
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let idx = d.join("idx");
    let out = search_index(&fixture("tiny-m3"), &bad, &idx, "qdrant");
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("bad.jsonl:21"),
        "{err}"
    );
    assert!(
        err.contains("20 passages were indexed before this and are kept"),
        "{err}"
    );
    assert_eq!(QdrantIndex::open(&idx).unwrap().count().unwrap(), 20);
    let out = search_index(&fixture("tiny-m3"), &full, &idx, "qdrant");
    ok(&out);
    assert!(stderr(&out).contains("indexed 10 new passages (30 held in all)"));
    assert_eq!(rows.len(), 30);
}

#[test]
fn another_model_or_a_foreign_directory_is_refused() {
    let d = tmp("retrieval-refuse");
    let (c, _) = demo_corpus(&d, 10, "c.jsonl");
    let idx = d.join("idx");
    ok(&search_index(&fixture("tiny-m3"), &c, &idx, "qdrant"));
    // A model of another width: indexing into the same directory and querying are refused.
    let other = narrower_model(&d.join("other"));
    let out = search_index(&other, &c, &idx, "qdrant");
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("dense size 32 vs 16"),
        "{err}"
    );
    let out = m3(
        &[
            "search",
            "query",
            MODEL,
            other.to_str().unwrap(),
            "--index",
            idx.to_str().unwrap(),
        ],
        b"\"x\"\n",
    );
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("dense size 32 vs 16"),
        "{err}"
    );
    assert_eq!(QdrantIndex::open(&idx).unwrap().count().unwrap(), 10);
    // A directory holding other files is not taken over.
    let foreign = d.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.tex"), "keep me").unwrap();
    let out = search_index(&fixture("tiny-m3"), &c, &foreign, "qdrant");
    assert!(
        !out.status.success() && stderr(&out).contains("not an m3 index"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("thesis.tex")).unwrap(),
        "keep me"
    );
}

#[test]
fn a_run_killed_while_writing_the_marker_leaves_a_directory_the_rerun_takes() {
    // What `kill -9` between the marker's temporary write and its rename leaves behind:
    // the directory with only `m3-qdrant.json.m3-tmp` in it (seen once in the hostile
    // kill test, whose timing rarely lands there).
    let d = tmp("retrieval-half-marker");
    let (c, _) = demo_corpus(&d, 10, "c.jsonl");
    let idx = d.join("idx");
    std::fs::create_dir_all(&idx).unwrap();
    std::fs::write(idx.join("m3-qdrant.json.m3-tmp"), b"{\"form").unwrap();
    let out = search_index(&fixture("tiny-m3"), &c, &idx, "qdrant");
    ok(&out);
    assert_eq!(QdrantIndex::open(&idx).unwrap().count().unwrap(), 10);
    assert!(!idx.join("m3-qdrant.json.m3-tmp").exists());
    // The same leftover next to a file of the user's is still refused, and both stay.
    let mixed = d.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::write(mixed.join("m3-qdrant.json.m3-tmp"), b"{").unwrap();
    std::fs::write(mixed.join("notes.txt"), "keep me").unwrap();
    let out = search_index(&fixture("tiny-m3"), &c, &mixed, "qdrant");
    assert!(
        !out.status.success() && stderr(&out).contains("not an m3 index"),
        "{}",
        stderr(&out)
    );
    assert!(mixed.join("m3-qdrant.json.m3-tmp").exists());
    assert_eq!(
        std::fs::read_to_string(mixed.join("notes.txt")).unwrap(),
        "keep me"
    );
}

#[test]
fn on_random_embeddings_both_engines_return_the_same_passages_and_scores() {
    // Random vectors have no exact ties, so the two engines must agree on every id and
    // every score bit; log-uniform token ids make the lexical candidate sets overlap
    // heavily, as text does.
    let d = tmp("retrieval-bench-search");
    let dir = d.join("b");
    let dir = dir.to_str().unwrap();
    let args = [
        "bench",
        "search",
        "--dir",
        dir,
        "--passages",
        "400",
        "--dense-dim",
        "16",
        "--colbert-dim",
        "8",
        "--colbert-tokens",
        "3",
        "--terms",
        "6",
        "--vocab",
        "500",
        "--queries",
        "30",
        "--query-tokens",
        "4",
        "--top-k",
        "5",
        "--batch",
        "64",
    ];
    let out = m3(&args, b"");
    ok(&out);
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let agreement = lines.iter().find(|l| l["what"] == "agreement").unwrap();
    assert_eq!(agreement["queries"], 30);
    assert_eq!(agreement["same_ids"], 30, "{agreement}");
    assert_eq!(agreement["same_scores"], 30, "{agreement}");
    for engine in ["m3", "qdrant"] {
        let index = lines
            .iter()
            .find(|l| l["engine"] == engine && l["what"] == "index")
            .unwrap();
        assert_eq!(index["passages"], 400);
    }
    // Indexes are not reused: a second run into the same directory is refused.
    let again = m3(&args, b"");
    assert!(!again.status.success() && stderr(&again).contains("exists"));
}
