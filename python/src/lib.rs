//! `m3._m3`: the native half of the Python package. A loaded model ([`Model`]) encodes
//! texts with the GIL released and returns NumPy arrays in the packed layout of
//! `m3 encode --npy-dir` (moved into NumPy, not copied); scoring goes through m3's one
//! implementation of each rule; search indexes are m3's. `python/m3/__init__.py` builds
//! FlagEmbedding's `BGEM3FlagModel` on top of it.

use std::path::PathBuf;

use m3::backend::cpu::Cpu;
use m3::model::embedder::{Embedder, Embedding, EncodeOptions};
use m3::model::heads::Pooling;
use m3::retrieval::Retriever;
use m3::score::{self, Weights};
use m3::DType;
use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// An m3 error as a Python exception carrying m3's message (file, tensor, index).
fn err(e: anyhow::Error) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

/// A model directory loaded on the CPU (f32).
#[pyclass(frozen)]
struct Model {
    inner: Embedder<Cpu>,
    dir: PathBuf,
}

/// Hybrid weights from a 3-sequence, checked.
fn weights(w: Option<Vec<f32>>) -> PyResult<Weights> {
    match w.as_deref() {
        None => Ok(Weights::default()),
        Some(&[d, s, c])
            if [d, s, c].iter().all(|x| x.is_finite() && *x >= 0.0) && d + s + c > 0.0 =>
        {
            Ok(Weights {
                dense: d,
                sparse: s,
                colbert: c,
            })
        }
        Some(other) => Err(PyValueError::new_err(format!(
            "weights {other:?}: expected three non-negative numbers with a positive sum"
        ))),
    }
}

#[pymethods]
impl Model {
    /// Loads `path` (BAAI's bge-m3 layout) on `device` ("cpu"; "cuda" needs a CUDA build).
    #[new]
    #[pyo3(signature = (path, device = "cpu"))]
    fn new(py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Self> {
        if device != "cpu" {
            return Err(PyValueError::new_err(format!(
                "device {device:?}: this build of m3 runs on the CPU only"
            )));
        }
        let dir = path.clone();
        let inner = py
            .detach(|| Embedder::load(&Cpu, &path, DType::F32))
            .map_err(err)?;
        Ok(Model { inner, dir })
    }

    /// Dense vector size.
    #[getter]
    fn dense_dim(&self) -> usize {
        self.inner.config.hidden_size
    }

    /// Colbert vector size (None without the head).
    #[getter]
    fn colbert_dim(&self) -> Option<usize> {
        self.inner.colbert_dim()
    }

    /// The longest input in tokens, special tokens included.
    #[getter]
    fn max_length(&self) -> usize {
        self.inner.max_tokens()
    }

    /// The model directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Encodes `texts` in one call (GIL released). Returns a dict of NumPy arrays in the
    /// packed layout: `dense` `[N, D]`; `colbert` `[T, D]` with `colbert_offsets` `[N+1]`;
    /// `lexical_ids`, `lexical_weights` with `lexical_offsets` `[N+1]`; and `truncated`.
    #[pyo3(signature = (texts, dense = true, sparse = true, colbert = false, max_length = 8192, mcls = false, batch_tokens = 16384, pooling = "cls"))]
    #[allow(clippy::too_many_arguments)]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        dense: bool,
        sparse: bool,
        colbert: bool,
        max_length: usize,
        mcls: bool,
        batch_tokens: usize,
        pooling: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        if max_length < 3 {
            return Err(PyValueError::new_err(format!(
                "max_length {max_length} leaves no room for text (CLS and EOS count): at least 3"
            )));
        }
        let pooling = match pooling {
            "cls" => Pooling::Cls,
            "mean" => Pooling::Mean,
            other => {
                return Err(PyValueError::new_err(format!(
                    "pooling {other:?}: expected \"cls\" or \"mean\""
                )))
            }
        };
        let opts = EncodeOptions {
            max_length,
            pooling,
            batch_tokens: batch_tokens.max(1),
            mcls,
            dense,
            sparse,
            colbert,
        };
        let out = py
            .detach(|| {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                self.inner.encode(&Cpu, &refs, &opts, &mut |_| {})
            })
            .map_err(err)?;
        let n = out.embeddings.len();
        let d = py_dict(py, &out.embeddings, n, self.dense_dim(), self.colbert_dim())?;
        d.set_item("truncated", out.truncated)?;
        Ok(d)
    }

    /// FlagEmbedding's `compute_score` for `(query, passage)` pairs: a dict of five lists
    /// (`dense`, `sparse`, `colbert`, `sparse+dense`, `colbert+sparse+dense`).
    #[pyo3(signature = (pairs, max_query_length = 512, max_passage_length = 8192, weights = None))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        pairs: Vec<(String, String)>,
        max_query_length: usize,
        max_passage_length: usize,
        weights: Option<Vec<f32>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let w = self::weights(weights)?;
        let scores = py
            .detach(|| -> anyhow::Result<Vec<score::PairScores>> {
                let q: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
                let p: Vec<&str> = pairs.iter().map(|p| p.1.as_str()).collect();
                let qo = EncodeOptions::all_outputs(max_query_length, 16384);
                let po = EncodeOptions::all_outputs(max_passage_length, 16384);
                let qe = self.inner.encode(&Cpu, &q, &qo, &mut |_| {})?.embeddings;
                let pe = self.inner.encode(&Cpu, &p, &po, &mut |_| {})?.embeddings;
                Ok(qe.iter().zip(&pe).map(|(q, p)| pair(q, p, w)).collect())
            })
            .map_err(err)?;
        let d = PyDict::new(py);
        d.set_item(
            "colbert",
            scores.iter().map(|s| s.colbert).collect::<Vec<_>>(),
        )?;
        d.set_item(
            "sparse",
            scores.iter().map(|s| s.sparse).collect::<Vec<_>>(),
        )?;
        d.set_item("dense", scores.iter().map(|s| s.dense).collect::<Vec<_>>())?;
        d.set_item(
            "sparse+dense",
            scores.iter().map(|s| s.sparse_dense).collect::<Vec<_>>(),
        )?;
        d.set_item(
            "colbert+sparse+dense",
            scores.iter().map(|s| s.all).collect::<Vec<_>>(),
        )?;
        Ok(d)
    }

    /// Each token id decoded on its own, as FlagEmbedding's `convert_id_to_token` does
    /// (None for an id outside the vocabulary).
    fn tokens(&self, ids: Vec<u32>) -> Vec<Option<String>> {
        let t = &self.inner.tokenizer;
        ids.into_iter()
            .map(|i| t.token(i).and_then(|_| t.decode(&[i]).ok()))
            .collect()
    }

    /// Hybrid retrieval of `queries` over `index`: per query, `(passage id as JSON text,
    /// score, dense, sparse, colbert)` for the best `top_k`.
    #[pyo3(signature = (index, queries, top_k = 10, weights = None, max_length = 512))]
    #[allow(clippy::type_complexity)]
    fn search(
        &self,
        py: Python<'_>,
        index: &Index,
        queries: Vec<String>,
        top_k: usize,
        weights: Option<Vec<f32>>,
        max_length: usize,
    ) -> PyResult<Vec<Vec<(String, f32, f32, f32, f32)>>> {
        let w = self::weights(weights)?;
        py.detach(|| -> anyhow::Result<_> {
            let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
            let opts = EncodeOptions::all_outputs(max_length, 16384);
            let qe = self
                .inner
                .encode(&Cpu, &refs, &opts, &mut |_| {})?
                .embeddings;
            qe.iter()
                .map(|q| {
                    Ok(index
                        .inner
                        .search(q, top_k, w)?
                        .into_iter()
                        .map(|h| {
                            let s = h.scores;
                            (h.id.to_string(), s.all, s.dense, s.sparse, s.colbert)
                        })
                        .collect())
                })
                .collect()
        })
        .map_err(err)
    }
}

fn pair(q: &Embedding, p: &Embedding, w: Weights) -> score::PairScores {
    let e = |v: &Option<Vec<f32>>| v.clone().unwrap_or_default();
    score::combine(
        score::dense(&e(&q.dense), &e(&p.dense)),
        score::lexical(
            q.lexical.as_deref().unwrap_or(&[]),
            p.lexical.as_deref().unwrap_or(&[]),
        ),
        score::colbert(
            q.colbert.as_deref().unwrap_or(&[]),
            p.colbert.as_deref().unwrap_or(&[]),
        ),
        w,
    )
}

/// The packed arrays of `n` embeddings.
fn py_dict<'py>(
    py: Python<'py>,
    es: &[Embedding],
    n: usize,
    dim: usize,
    cdim: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    if es.iter().all(|e| e.dense.is_some()) {
        let v: Vec<f32> = es.iter().flat_map(|e| e.dense.clone().unwrap()).collect();
        d.set_item("dense", PyArray1::from_vec(py, v).reshape([n, dim])?)?;
    }
    if es.iter().all(|e| e.colbert.is_some()) {
        let cd = cdim.unwrap_or(0);
        let mut off = vec![0i64];
        let mut v = Vec::new();
        for e in es {
            let rows = e.colbert.as_ref().unwrap();
            for r in rows {
                v.extend_from_slice(r);
            }
            off.push(off.last().unwrap() + rows.len() as i64);
        }
        let t = *off.last().unwrap() as usize;
        d.set_item("colbert", PyArray1::from_vec(py, v).reshape([t, cd])?)?;
        d.set_item("colbert_offsets", off.into_pyarray(py))?;
    }
    if es.iter().all(|e| e.lexical.is_some()) {
        let mut off = vec![0i64];
        let (mut ids, mut ws) = (Vec::new(), Vec::new());
        for e in es {
            let l = e.lexical.as_ref().unwrap();
            ids.extend(l.iter().map(|p| p.0));
            ws.extend(l.iter().map(|p| p.1));
            off.push(off.last().unwrap() + l.len() as i64);
        }
        d.set_item("lexical_ids", ids.into_pyarray(py))?;
        d.set_item("lexical_weights", ws.into_pyarray(py))?;
        d.set_item("lexical_offsets", off.into_pyarray(py))?;
    }
    Ok(d)
}

/// An `m3 search index` directory (either engine), opened.
#[pyclass(frozen)]
struct Index {
    inner: Box<dyn Retriever>,
}

#[pymethods]
impl Index {
    /// Opens the index in `path` (m3's own files are verified: checksums, shapes,
    /// offsets).
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| m3::retrieval::open(&path)).map_err(err)?;
        Ok(Index { inner })
    }

    /// Passages in the index.
    fn __len__(&self) -> PyResult<usize> {
        self.inner.passages().map_err(err)
    }
}

/// The lexical matching score of two `(ids, weights)` lists (ids sorted), m3's rule.
#[pyfunction]
fn lexical_score(
    a_ids: PyReadonlyArray1<'_, u32>,
    a_w: PyReadonlyArray1<'_, f32>,
    b_ids: PyReadonlyArray1<'_, u32>,
    b_w: PyReadonlyArray1<'_, f32>,
) -> PyResult<f32> {
    let pairs = |i: &PyReadonlyArray1<'_, u32>,
                 w: &PyReadonlyArray1<'_, f32>|
     -> PyResult<Vec<(u32, f32)>> {
        let (i, w) = (i.as_slice()?, w.as_slice()?);
        if i.len() != w.len() {
            return Err(PyValueError::new_err("ids and weights differ in length"));
        }
        let mut v: Vec<(u32, f32)> = i.iter().copied().zip(w.iter().copied()).collect();
        v.sort_by_key(|p| p.0);
        Ok(v)
    };
    Ok(score::lexical(&pairs(&a_ids, &a_w)?, &pairs(&b_ids, &b_w)?))
}

/// The colbert (max-sim) score of query vectors `[n, D]` against passage vectors `[m, D]`.
#[pyfunction]
fn colbert_score(q: PyReadonlyArray2<'_, f32>, p: PyReadonlyArray2<'_, f32>) -> PyResult<f32> {
    let (q, p) = (q.as_array(), p.as_array());
    if q.ncols() != p.ncols() {
        return Err(PyValueError::new_err(format!(
            "query vectors have {} values, passage vectors {}",
            q.ncols(),
            p.ncols()
        )));
    }
    let rows = |a: numpy::ndarray::ArrayView2<'_, f32>| -> Vec<Vec<f32>> {
        a.outer_iter().map(|r| r.to_vec()).collect()
    };
    Ok(score::colbert(&rows(q), &rows(p)))
}

/// The native module.
#[pymodule]
fn _m3(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Index>()?;
    m.add_function(wrap_pyfunction!(lexical_score, m)?)?;
    m.add_function(wrap_pyfunction!(colbert_score, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
