"""The Python package on the fixture model: FlagEmbedding's goldens through both APIs (same
tolerances as the Rust parity tests), FlagEmbedding's README example with only the import
changed, concurrent threads, and the documented errors."""

import json
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest

import m3
from m3 import BGEM3FlagModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "fixtures", "tiny-m3")
GOLDEN = json.load(open(os.path.join(ROOT, "fixtures", "tiny-m3-golden.json")))
ATOL = 1e-4


@pytest.fixture(scope="module")
def flag():
    return BGEM3FlagModel(MODEL, use_fp16=True)


def texts():
    return [r["text"] for r in GOLDEN["records"]]


def test_flagembedding_api_matches_the_goldens(flag):
    out = flag.encode(texts(), max_length=GOLDEN["max_length"], return_dense=True,
                      return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].dtype == np.float32
    assert out["dense_vecs"].shape == (len(texts()), len(GOLDEN["records"][0]["dense_vecs"]))
    for i, r in enumerate(GOLDEN["records"]):
        np.testing.assert_allclose(out["dense_vecs"][i], r["dense_vecs"], atol=ATOL)
        got, want = out["lexical_weights"][i], r["lexical_weights"]
        assert set(got) == set(want), f"text {i}: token ids differ"
        for k in want:
            assert abs(got[k] - want[k]) <= ATOL, (i, k)
        assert out["colbert_vecs"][i].shape == np.asarray(r["colbert_vecs"]).shape
        np.testing.assert_allclose(out["colbert_vecs"][i], r["colbert_vecs"], atol=ATOL)
    # One string in, one result out, as FlagEmbedding does.
    one = flag.encode(texts()[1], max_length=GOLDEN["max_length"])
    np.testing.assert_allclose(one["dense_vecs"], GOLDEN["records"][1]["dense_vecs"], atol=ATOL)
    assert one["lexical_weights"] is None and one["colbert_vecs"] is None


def test_native_api_packs_the_same_outputs():
    m = m3.Model(MODEL)
    out = m.encode(texts(), max_length=GOLDEN["max_length"])
    n = len(texts())
    assert out["dense"].shape == (n, m.dense_dim)
    assert out["colbert_offsets"].shape == (n + 1,) and out["colbert_offsets"][0] == 0
    assert out["colbert"].shape == (out["colbert_offsets"][-1], m.colbert_dim)
    assert out["lexical_offsets"][-1] == len(out["lexical_ids"]) == len(out["lexical_weights"])
    for i, r in enumerate(GOLDEN["records"]):
        np.testing.assert_allclose(out["dense"][i], r["dense_vecs"], atol=ATOL)
        a, b = out["colbert_offsets"][i], out["colbert_offsets"][i + 1]
        np.testing.assert_allclose(out["colbert"][a:b], r["colbert_vecs"], atol=ATOL)
        a, b = out["lexical_offsets"][i], out["lexical_offsets"][i + 1]
        got = dict(zip(out["lexical_ids"][a:b].tolist(), out["lexical_weights"][a:b].tolist()))
        want = {int(k): v for k, v in r["lexical_weights"].items()}
        assert set(got) == set(want)
        for k in want:
            assert abs(got[k] - want[k]) <= ATOL


def test_compute_score_matches_flagembedding(flag):
    s = GOLDEN["score"]
    pairs = [[p["query"], p["passage"]] for p in s["pairs"]]
    got = flag.compute_score(pairs, max_query_length=s["query_max_length"],
                             max_passage_length=s["passage_max_length"],
                             weights_for_different_modes=s["weights"])
    for k in ["dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"]:
        want = [p[k] for p in s["pairs"]]
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-6, err_msg=k)
    # The pieces agree with the whole.
    q = flag.encode(pairs[0][0], max_length=s["query_max_length"], return_sparse=True,
                    return_colbert_vecs=True)
    p = flag.encode(pairs[0][1], max_length=s["passage_max_length"], return_sparse=True,
                    return_colbert_vecs=True)
    lex = flag.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
    assert abs(lex - got["sparse"][0]) <= 1e-4 * max(1.0, abs(lex))
    col = flag.colbert_score(q["colbert_vecs"], p["colbert_vecs"])
    assert abs(col - got["colbert"][0]) <= 1e-5
    matrix = flag.compute_lexical_matching_score([q["lexical_weights"]] * 2,
                                                 [p["lexical_weights"]] * 3)
    assert matrix.shape == (2, 3)


def test_flagembeddings_readme_example_runs_with_the_import_changed():
    # FlagEmbedding's README for BGE-M3, with `from m3 import` and a local directory.
    model = BGEM3FlagModel(MODEL, use_fp16=True)
    sentences_1 = ["What is BGE M3?", "Defination of BM25"]
    sentences_2 = ["BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
                   "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document"]
    embeddings_1 = model.encode(sentences_1, batch_size=12, max_length=8192)["dense_vecs"]
    embeddings_2 = model.encode(sentences_2)["dense_vecs"]
    similarity = embeddings_1 @ embeddings_2.T
    assert similarity.shape == (2, 2)
    output_1 = model.encode(sentences_1, return_dense=True, return_sparse=True, return_colbert_vecs=False)
    output_2 = model.encode(sentences_2, return_dense=True, return_sparse=True, return_colbert_vecs=False)
    tokens = model.convert_id_to_token(output_1["lexical_weights"])
    assert isinstance(tokens, list) and all(isinstance(k, str) for k in tokens[0])
    lexical_scores = model.compute_lexical_matching_score(output_1["lexical_weights"][0], output_2["lexical_weights"][0])
    assert lexical_scores >= 0
    output_1 = model.encode(sentences_1, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    output_2 = model.encode(sentences_2, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    c = model.colbert_score(output_1["colbert_vecs"][0], output_2["colbert_vecs"][0])
    assert -1.0 <= c <= 1.0
    sentence_pairs = [[i, j] for i in sentences_1 for j in sentences_2]
    scores = model.compute_score(sentence_pairs, max_passage_length=128, weights_for_different_modes=[0.4, 0.2, 0.4])
    assert set(scores) == {"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}
    assert len(scores["dense"]) == 4


def test_threads_encode_concurrently_with_correct_results():
    m = m3.Model(MODEL)
    t = texts()
    want = m.encode(t)["dense"]
    results, errors = {}, []

    def work(k):
        try:
            sub = [t[(k + j) % len(t)] for j in range(5)]
            results[k] = m.encode(sub)["dense"]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for k, got in results.items():
        for j in range(5):
            np.testing.assert_allclose(got[j], want[(k + j) % len(t)], atol=1e-6)


def test_bad_arguments_raise_the_documented_errors(tmp_path):
    with pytest.raises(ValueError, match="query_instruction_format_x"):
        BGEM3FlagModel(MODEL, query_instruction_format_x="{}")
    with pytest.raises(ValueError, match="not a local model directory"):
        BGEM3FlagModel("BAAI/bge-m3")
    with pytest.raises(ValueError, match="devices"):
        BGEM3FlagModel(MODEL, devices=["cuda:0"])
    flag = BGEM3FlagModel(MODEL)
    with pytest.raises(ValueError, match="convert_to_numpy"):
        flag.encode(["x"], convert_to_numpy=True)
    m = m3.Model(MODEL)
    with pytest.raises(ValueError, match="max_length"):
        m.encode(["x"], max_length=2)
    with pytest.raises(TypeError):
        m.encode("one string")
    with pytest.raises(ValueError, match="unknown outputs"):
        m.encode(["x"], outputs=["dense", "lexical"])
    # A directory without the colbert head: an error naming the file, not random heads.
    d = tmp_path / "no-colbert"
    shutil.copytree(MODEL, d, ignore=shutil.ignore_patterns("colbert_linear.pt", "alt"))
    with pytest.raises(RuntimeError, match="colbert_linear"):
        m3.Model(d).encode(["x"], outputs=["colbert"])
    # A broken model file: the Rust message, naming the file.
    (d / "config.json").write_text("{")
    with pytest.raises(RuntimeError, match="config.json"):
        m3.Model(d)


def test_search_over_an_m3_index(tmp_path):
    binary = os.environ.get("M3_BIN") or os.path.join(ROOT, "target", "debug", "m3")
    if not os.path.exists(binary):
        pytest.skip("no m3 binary (cargo build, or set M3_BIN)")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n"
                              for i, t in enumerate(texts()[4:14])))
    idx = tmp_path / "idx"
    subprocess.run([binary, "search", "index", "--model", MODEL, "--corpus", str(corpus),
                    "--index", str(idx)], check=True, capture_output=True)
    index = m3.Index(str(idx))
    assert len(index) == 10
    hits = m3.Model(MODEL).search(index, [texts()[7]], top_k=3)
    assert hits[0][0]["id"] == "p3"
    assert len(hits[0]) == 3 and hits[0][0]["score"] >= hits[0][1]["score"]
