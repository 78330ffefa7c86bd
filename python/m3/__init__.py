"""m3: BGE-M3 (M3-Embedding) dense, sparse and colbert embeddings without PyTorch.

Two APIs over one native model:

* ``BGEM3FlagModel``: FlagEmbedding's class with its names and meaning, so code that does
  ``from FlagEmbedding import BGEM3FlagModel`` works with the import line changed.
* ``Model``: m3's own, returning NumPy arrays in the packed layout of ``m3 encode --npy-dir``
  (``colbert`` ``[T, D]`` with ``colbert_offsets``; ``lexical_ids`` / ``lexical_weights`` with
  ``lexical_offsets``), plus ``score`` and ``search`` over ``m3 search`` indexes.

Where m3 deliberately differs from FlagEmbedding (SPEC): colbert vectors cover each text's
real tokens only (no zero rows for padding), and asking for sparse or colbert output from a
directory without ``sparse_linear.pt`` / ``colbert_linear.pt`` raises instead of using random
heads. Model paths are local directories (no hub download). The GIL is released while m3
computes, so threads encode concurrently.
"""

from collections import defaultdict
import os

import numpy as np

from . import _m3

__all__ = ["BGEM3FlagModel", "Model", "Index", "__version__"]
__version__ = _m3.__version__

Index = _m3.Index


class Model:
    """A BGE-M3 model directory loaded by m3 (``device="cpu"``)."""

    def __init__(self, path, device="cpu"):
        self._m = _m3.Model(os.fspath(path), device)

    @property
    def dense_dim(self):
        """Dense vector size."""
        return self._m.dense_dim

    @property
    def colbert_dim(self):
        """Colbert vector size, or None without the head."""
        return self._m.colbert_dim

    @property
    def max_length(self):
        """The longest input in tokens, special tokens included."""
        return self._m.max_length

    def encode(self, texts, outputs=("dense", "sparse", "colbert"), max_length=8192,
               mcls=False, batch_tokens=16384, pooling="cls"):
        """Encodes texts; returns a dict of packed NumPy arrays (see the module doc)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings (got one string)")
        outputs = set(outputs)
        unknown = outputs - {"dense", "sparse", "colbert"}
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}: use dense, sparse, colbert")
        return self._m.encode(list(texts), "dense" in outputs, "sparse" in outputs,
                              "colbert" in outputs, max_length, mcls, batch_tokens, pooling)

    def score(self, pairs, max_query_length=512, max_passage_length=8192, weights=None):
        """``compute_score``'s five lists for ``(query, passage)`` pairs."""
        return self._m.score([tuple(p) for p in pairs], max_query_length, max_passage_length,
                             None if weights is None else [float(w) for w in weights])

    def search(self, index, queries, top_k=10, weights=None, max_length=512):
        """Hybrid retrieval over an ``m3.Index``: per query, a list of dicts
        ``{"id", "score", "dense", "sparse", "colbert"}``, best first."""
        import json
        hits = self._m.search(index, list(queries), top_k,
                              None if weights is None else [float(w) for w in weights],
                              max_length)
        return [[{"id": json.loads(i), "score": s, "dense": d, "sparse": sp, "colbert": c}
                 for (i, s, d, sp, c) in q] for q in hits]


def _split(arr, offsets):
    return [arr[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


class BGEM3FlagModel:
    """FlagEmbedding's ``BGEM3FlagModel`` on m3.

    ``use_fp16`` is accepted for compatibility: m3 computes in f32 on the CPU (bf16 on a
    GPU build) whatever it says. ``batch_size`` (here and in ``encode``) is accepted and
    changes nothing: m3 packs texts into batches by a token budget, without padding.
    ``devices`` may be None or ``"cpu"``. Other FlagEmbedding arguments m3 does not
    implement raise ``ValueError`` naming them.
    """

    _ACCEPTED = {"normalize_embeddings", "pooling_method", "trust_remote_code", "cache_dir",
                 "colbert_dim", "return_sparse", "return_dense", "return_colbert_vecs"}

    def __init__(self, model_name_or_path, normalize_embeddings=True, use_fp16=True,
                 query_instruction_for_retrieval=None, query_instruction_format="{}{}",
                 devices=None, pooling_method="cls", trust_remote_code=False, cache_dir=None,
                 colbert_dim=-1, batch_size=256, query_max_length=512,
                 passage_max_length=512, return_dense=True, return_sparse=False,
                 return_colbert_vecs=False, **kwargs):
        if kwargs:
            raise ValueError(f"m3's BGEM3FlagModel does not support {sorted(kwargs)}")
        if not os.path.isdir(model_name_or_path):
            raise ValueError(
                f"{model_name_or_path!r} is not a local model directory: m3 loads directories "
                "in BAAI's bge-m3 layout and downloads nothing")
        if not normalize_embeddings:
            raise ValueError("normalize_embeddings=False is not supported: m3's dense vectors "
                             "are L2-normalised, as BGE-M3's")
        if pooling_method != "cls":
            raise ValueError(f"pooling_method {pooling_method!r}: BGE-M3 pools the CLS token; "
                             "use m3.Model(..).encode(pooling='mean') for mean pooling")
        if query_instruction_for_retrieval:
            raise ValueError("query_instruction_for_retrieval is not supported (BGE-M3 uses "
                             "no instruction)")
        if colbert_dim not in (-1, None):
            raise ValueError("colbert_dim is read from colbert_linear; do not pass it")
        if devices not in (None, "cpu", ["cpu"]):
            raise ValueError(f"devices {devices!r}: this build of m3 runs on the CPU only")
        self.model = Model(model_name_or_path)
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.return_dense = return_dense
        self.return_sparse = return_sparse
        self.return_colbert_vecs = return_colbert_vecs

    def _encode(self, sentences, max_length, return_dense, return_sparse,
                return_colbert_vecs, kwargs):
        if kwargs:
            raise ValueError(f"m3's encode does not support {sorted(kwargs)}")
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        outputs = [n for n, on in (("dense", return_dense), ("sparse", return_sparse),
                                   ("colbert", return_colbert_vecs)) if on]
        if not outputs:
            raise ValueError("ask for at least one of return_dense, return_sparse, "
                             "return_colbert_vecs")
        out = self.model.encode(texts, outputs, max_length=max_length)
        result = {"dense_vecs": None, "lexical_weights": None, "colbert_vecs": None}
        if return_dense:
            result["dense_vecs"] = out["dense"]
        if return_sparse:
            ids, ws = out["lexical_ids"], out["lexical_weights"]
            result["lexical_weights"] = []
            for i_ids, i_ws in zip(_split(ids, out["lexical_offsets"]),
                                   _split(ws, out["lexical_offsets"])):
                d = defaultdict(int)
                for t, w in zip(i_ids.tolist(), i_ws.tolist()):
                    d[str(t)] = w
                result["lexical_weights"].append(d)
        if return_colbert_vecs:
            result["colbert_vecs"] = _split(out["colbert"], out["colbert_offsets"])
        if single:
            for k, v in result.items():
                if v is not None:
                    result[k] = v[0]
        return result

    def encode(self, sentences, batch_size=None, max_length=None, return_dense=None,
               return_sparse=None, return_colbert_vecs=None, **kwargs):
        """Dense, lexical and/or colbert outputs, as FlagEmbedding's ``encode``."""
        return self._encode(
            sentences, max_length or self.passage_max_length,
            self.return_dense if return_dense is None else return_dense,
            self.return_sparse if return_sparse is None else return_sparse,
            self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs,
            kwargs)

    def encode_queries(self, queries, batch_size=None, max_length=None, return_dense=None,
                       return_sparse=None, return_colbert_vecs=None, **kwargs):
        """``encode`` with ``query_max_length``."""
        return self.encode(queries, batch_size, max_length or self.query_max_length,
                           return_dense, return_sparse, return_colbert_vecs, **kwargs)

    def encode_corpus(self, corpus, batch_size=None, max_length=None, return_dense=None,
                      return_sparse=None, return_colbert_vecs=None, **kwargs):
        """``encode`` with ``passage_max_length``."""
        return self.encode(corpus, batch_size, max_length or self.passage_max_length,
                           return_dense, return_sparse, return_colbert_vecs, **kwargs)

    def compute_score(self, sentence_pairs, batch_size=None, max_query_length=None,
                      max_passage_length=None, weights_for_different_modes=None, **kwargs):
        """FlagEmbedding's ``compute_score``: ``dense``, ``sparse``, ``colbert``,
        ``sparse+dense``, ``colbert+sparse+dense`` lists (or floats for one pair)."""
        if kwargs:
            raise ValueError(f"m3's compute_score does not support {sorted(kwargs)}")
        single = isinstance(sentence_pairs[0], str)
        pairs = [sentence_pairs] if single else list(sentence_pairs)
        scores = self.model.score(pairs, max_query_length or self.query_max_length,
                                  max_passage_length or self.passage_max_length,
                                  weights_for_different_modes)
        if single:
            return {k: v[0] for k, v in scores.items()}
        return scores

    def compute_lexical_matching_score(self, lexical_weights_1, lexical_weights_2):
        """Σ w1(t)·w2(t) over shared tokens; a matrix for two lists of dicts."""
        def arrays(d):
            ids = np.array([int(k) for k in d.keys()], dtype=np.uint32)
            ws = np.array([float(v) for v in d.values()], dtype=np.float32)
            return ids, ws

        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return _m3.lexical_score(*arrays(lexical_weights_1), *arrays(lexical_weights_2))
        a = [arrays(d) for d in lexical_weights_1]
        b = [arrays(d) for d in lexical_weights_2]
        return np.array([[_m3.lexical_score(*x, *y) for y in b] for x in a])

    def colbert_score(self, q_reps, p_reps):
        """Mean over query vectors of the best passage-vector similarity."""
        q = np.ascontiguousarray(q_reps, dtype=np.float32)
        p = np.ascontiguousarray(p_reps, dtype=np.float32)
        return _m3.colbert_score(q, p)

    def convert_id_to_token(self, lexical_weights):
        """``{token_id_str: weight}`` (or a list of them) with tokens for ids."""
        single = isinstance(lexical_weights, dict)
        items = [lexical_weights] if single else lexical_weights
        out = []
        for d in items:
            ids = [int(k) for k in d]
            toks = self.model._m.tokens(ids)
            out.append({t: w for t, w in zip(toks, d.values()) if t is not None})
        return out[0] if single else out
