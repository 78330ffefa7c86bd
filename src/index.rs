//! The search index on disk (`m3 search index | query`): a dense matrix, colbert rows with
//! per-passage offsets, an inverted lexical index, and `meta.json` with the passage ids,
//! the model's fingerprint and a checksum of every file. Built in a temporary sibling and
//! swapped into place whole ([`crate::atomic`]); loading checks every checksum, shape and
//! offset, so a damaged index or one from another model is an error naming what differs,
//! never a panic or plausible-looking scores. Retrieval is SPEC §4's hybrid: candidates from
//! dense top-k ∪ lexical top-k, re-ranked by the weighted dense + lexical + colbert score.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::atomic::{ensure_replaceable, StagedDir};
use crate::model::checkpoint::read_checkpoint_bytes;
use crate::model::embedder::Embedding;
use crate::score::{self, InvertedIndex, PairScores, Weights};

/// The on-disk format this code writes and reads.
pub const FORMAT: &str = "m3-index/2";
/// Every file of an index directory (what `m3 search index` may replace).
pub const FILES: [&str; 4] = [
    "meta.json",
    "dense.safetensors",
    "colbert.safetensors",
    "lexical.json",
];

/// A content hash: xxh3-128 in hex. Not cryptographic: it catches damage and mix-ups.
pub fn hash_bytes(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// [`hash_bytes`] of a file's contents, streamed.
pub fn hash_file(path: &Path) -> anyhow::Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// What identifies the model an index was built with: output sizes, vocabulary, and the
/// content hash of each file that decides the embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFingerprint {
    /// Dense vector size.
    pub dense_dim: usize,
    /// Colbert vector size.
    pub colbert_dim: usize,
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
    /// File name → [`hash_bytes`] of its contents.
    pub files: BTreeMap<String, String>,
}

impl ModelFingerprint {
    /// The fingerprint of the model directory `dir` whose loaded model has these sizes:
    /// hashes of its config, tokenizer, encoder weights and heads.
    pub fn of_dir(
        dir: &Path,
        dense_dim: usize,
        colbert_dim: usize,
        vocab_size: usize,
    ) -> anyhow::Result<Self> {
        let weights = crate::model::weights::weights_file(dir)?;
        let mut paths: Vec<PathBuf> = vec![dir.join("config.json"), dir.join("tokenizer.json")];
        paths.push(weights);
        for stem in ["colbert_linear", "sparse_linear"] {
            if let Some(p) = ["pt", "safetensors"]
                .iter()
                .map(|e| dir.join(format!("{stem}.{e}")))
                .find(|p| p.exists())
            {
                paths.push(p);
            }
        }
        let mut files = BTreeMap::new();
        for p in paths {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            files.insert(name, hash_file(&p)?);
        }
        Ok(ModelFingerprint {
            dense_dim,
            colbert_dim,
            vocab_size,
            files,
        })
    }

    /// The fingerprint of a loaded model: its sizes and its directory's files.
    pub fn of_model<B: crate::backend::Backend>(
        model: &crate::model::embedder::Embedder<B>,
    ) -> anyhow::Result<Self> {
        Self::of_dir(
            model.dir(),
            model.config.hidden_size,
            model.colbert_dim().unwrap_or(0),
            model.config.vocab_size,
        )
    }

    /// What differs from `other`, one phrase each; empty when they match.
    pub fn differences(&self, other: &ModelFingerprint) -> Vec<String> {
        let mut d = Vec::new();
        for (what, a, b) in [
            ("dense size", self.dense_dim, other.dense_dim),
            ("colbert size", self.colbert_dim, other.colbert_dim),
            ("vocabulary size", self.vocab_size, other.vocab_size),
        ] {
            if a != b {
                d.push(format!("{what} {a} vs {b}"));
            }
        }
        let names: BTreeSet<&String> = self.files.keys().chain(other.files.keys()).collect();
        for n in names {
            match (self.files.get(n), other.files.get(n)) {
                (Some(a), Some(b)) if a != b => d.push(format!("{n} differs")),
                (Some(_), None) => d.push(format!("{n} only in the index's model")),
                (None, Some(_)) => d.push(format!("{n} only in this model")),
                _ => {}
            }
        }
        d
    }
}

/// `meta.json`: counts, ids, offsets, the model's fingerprint and every file's checksum.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    format: String,
    count: usize,
    ids: Vec<Value>,
    dense_dim: usize,
    colbert_dim: usize,
    colbert_offsets: Vec<usize>,
    model: ModelFingerprint,
    /// File name → [`hash_bytes`] of the other three files.
    checksums: BTreeMap<String, String>,
    /// [`meta_checksum`] of this object.
    checksum: String,
}

/// The checksum `meta.json` records of itself: [`hash_bytes`] of its JSON with
/// `"checksum": ""`, keys sorted at every level.
pub fn meta_checksum(meta: &Value) -> String {
    let mut v = meta.clone();
    v["checksum"] = Value::from("");
    hash_bytes(&serde_json::to_vec(&sorted_keys(&v)).expect("JSON values serialise"))
}

/// `v` with every object's keys in sorted order, whatever order the parser kept (serde_json
/// keeps insertion order when a dependency turns on its `preserve_order`).
fn sorted_keys(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted_keys(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted_keys).collect()),
        x => x.clone(),
    }
}

impl Meta {
    fn own_checksum(&self) -> anyhow::Result<String> {
        Ok(meta_checksum(&serde_json::to_value(self)?))
    }
}

/// Collects passages' embeddings for an index, checking each as it comes.
pub struct IndexWriter {
    model: ModelFingerprint,
    ids: Vec<Value>,
    dense: Vec<f32>,
    colbert: Vec<f32>,
    offsets: Vec<usize>,
    lexical: Vec<Vec<(u32, f32)>>,
}

impl IndexWriter {
    /// An empty index for embeddings of the model `model` describes.
    pub fn new(model: ModelFingerprint) -> Self {
        IndexWriter {
            model,
            ids: Vec::new(),
            dense: Vec::new(),
            colbert: Vec::new(),
            offsets: vec![0],
            lexical: Vec::new(),
        }
    }

    /// Passages added so far.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no passage was added.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Adds one passage (all three outputs needed); a vector of the wrong size or a NaN
    /// or infinite value is an error naming `what` (the passage's source line).
    pub fn add(&mut self, id: Value, e: &Embedding, what: &str) -> anyhow::Result<()> {
        let (Some(d), Some(l), Some(c)) = (&e.dense, &e.lexical, &e.colbert) else {
            bail!("{what}: an index needs dense, lexical and colbert outputs");
        };
        ensure!(
            d.len() == self.model.dense_dim,
            "{what}: dense vector of {} values, the model's size is {}",
            d.len(),
            self.model.dense_dim
        );
        let finite = d.iter().all(|x| x.is_finite())
            && l.iter().all(|p| p.1.is_finite())
            && c.iter().flatten().all(|x| x.is_finite());
        ensure!(
            finite,
            "{what}: the model produced NaN or infinite values; refusing to index them"
        );
        for row in c {
            ensure!(
                row.len() == self.model.colbert_dim,
                "{what}: colbert vector of {} values, the model's size is {}",
                row.len(),
                self.model.colbert_dim
            );
            self.colbert.extend_from_slice(row);
        }
        self.dense.extend_from_slice(d);
        self.offsets.push(self.offsets.last().unwrap() + c.len());
        self.lexical.push(l.clone());
        self.ids.push(id);
        Ok(())
    }

    /// Writes the index to `dir`, replacing an older index there only once the new one is
    /// complete and on disk. `dir` must be absent, empty or an index.
    pub fn write(self, dir: &Path) -> anyhow::Result<()> {
        ensure_replaceable(dir, &FILES, "an m3 index")?;
        ensure!(!self.ids.is_empty(), "an index needs at least one passage");
        let stage = StagedDir::new(dir)?;
        let rows = *self.offsets.last().unwrap();
        let mut checksums = BTreeMap::new();
        let dense = f32_file("dense", &self.dense, [self.ids.len(), self.model.dense_dim])?;
        let colbert = f32_file("colbert", &self.colbert, [rows, self.model.colbert_dim])?;
        let postings: BTreeMap<u32, Vec<(u32, f32)>> = InvertedIndex::build(&self.lexical)
            .postings()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let lexical = serde_json::to_vec(&postings)?;
        for (name, bytes) in [
            ("dense.safetensors", &dense),
            ("colbert.safetensors", &colbert),
            ("lexical.json", &lexical),
        ] {
            let path = stage.path().join(name);
            std::fs::write(&path, bytes)
                .with_context(|| format!("{}: cannot write", path.display()))?;
            checksums.insert(name.to_string(), hash_bytes(bytes));
        }
        let mut meta = Meta {
            format: FORMAT.into(),
            count: self.ids.len(),
            ids: self.ids,
            dense_dim: self.model.dense_dim,
            colbert_dim: self.model.colbert_dim,
            colbert_offsets: self.offsets,
            model: self.model,
            checksums,
            checksum: String::new(),
        };
        meta.checksum = meta.own_checksum()?;
        let path = stage.path().join("meta.json");
        std::fs::write(&path, serde_json::to_vec(&meta)?)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        stage.commit()
    }
}

/// A safetensors file holding one f32 tensor.
fn f32_file(name: &str, data: &[f32], shape: [usize; 2]) -> anyhow::Result<Vec<u8>> {
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        shape.to_vec(),
        bytemuck::cast_slice(data),
    )?;
    Ok(safetensors::tensor::serialize([(name, view)], None)?)
}

/// One retrieved passage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Its position in the index.
    pub passage: usize,
    /// Its scores; `all` is the hybrid that ranks.
    pub scores: PairScores,
}

/// A loaded, verified index.
pub struct Index {
    meta: Meta,
    dense: Vec<f32>,
    colbert: Vec<f32>,
    lexical: InvertedIndex,
}

/// Reads a file of the index and checks it against its recorded checksum.
fn checked_read(dir: &Path, name: &str, meta: &Meta) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let want = meta
        .checksums
        .get(name)
        .with_context(|| format!("{}: meta.json has no checksum for it", path.display()))?;
    let got = hash_bytes(&bytes);
    ensure!(
        &got == want,
        "{}: damaged (checksum {got}, meta.json records {want}); rebuild the index",
        path.display()
    );
    Ok(bytes)
}

/// The one f32 tensor `name` of a safetensors file, with its shape.
fn f32_tensor(path: &Path, bytes: &[u8], name: &str) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
    let mut t = read_checkpoint_bytes(path, bytes)?;
    let t = t
        .remove(name)
        .with_context(|| format!("{}: tensor {name} is missing", path.display()))?;
    ensure!(
        t.data.iter().all(|x| x.is_finite()),
        "{}: holds NaN or infinite values",
        path.display()
    );
    Ok((t.data, t.shape))
}

impl Index {
    /// Loads the index in `dir`, verifying checksums, shapes, offsets and postings.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let meta_path = dir.join("meta.json");
        let bytes = std::fs::read(&meta_path).with_context(|| {
            format!(
                "{}: cannot read: not an index (run m3 search index)",
                meta_path.display()
            )
        })?;
        let format = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("format").and_then(|f| f.as_str()).map(str::to_string));
        if let Some(f) = format.as_deref().filter(|&f| f != FORMAT) {
            bail!(
                "{}: index format {f:?}, this m3 reads {FORMAT:?}: rebuild it with m3 search index",
                meta_path.display()
            );
        }
        let meta: Meta = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: malformed", meta_path.display()))?;
        ensure!(
            meta.own_checksum()? == meta.checksum,
            "{}: damaged (its checksum does not match its contents); rebuild the index",
            meta_path.display()
        );
        let m = &meta;
        let bad = |what: String| anyhow::anyhow!("{}: {what}", meta_path.display());
        if m.ids.len() != m.count {
            return Err(bad(format!("{} ids for {} passages", m.ids.len(), m.count)));
        }
        if m.colbert_offsets.len() != m.count + 1
            || m.colbert_offsets.first() != Some(&0)
            || m.colbert_offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(bad(format!(
                "colbert offsets must be {} non-decreasing values from 0",
                m.count + 1
            )));
        }
        if m.dense_dim != m.model.dense_dim || m.colbert_dim != m.model.colbert_dim {
            return Err(bad("sizes disagree with the model fingerprint".into()));
        }
        let rows = *m.colbert_offsets.last().unwrap();
        let dense_path = dir.join("dense.safetensors");
        let (dense, dshape) = f32_tensor(
            &dense_path,
            &checked_read(dir, "dense.safetensors", m)?,
            "dense",
        )?;
        ensure!(
            dshape == [m.count, m.dense_dim],
            "{}: shape {dshape:?}, meta.json says [{}, {}]",
            dense_path.display(),
            m.count,
            m.dense_dim
        );
        let colbert_path = dir.join("colbert.safetensors");
        let (colbert, cshape) = f32_tensor(
            &colbert_path,
            &checked_read(dir, "colbert.safetensors", m)?,
            "colbert",
        )?;
        ensure!(
            cshape == [rows, m.colbert_dim],
            "{}: shape {cshape:?}, meta.json's offsets say [{rows}, {}]",
            colbert_path.display(),
            m.colbert_dim
        );
        let lex_path = dir.join("lexical.json");
        let postings: HashMap<u32, Vec<(u32, f32)>> =
            serde_json::from_slice(&checked_read(dir, "lexical.json", m)?)
                .with_context(|| format!("{}: malformed", lex_path.display()))?;
        for &(p, w) in postings.values().flatten() {
            ensure!(
                (p as usize) < m.count && w.is_finite(),
                "{}: a posting ({p}, {w}) names no passage of {} or is not finite",
                lex_path.display(),
                m.count
            );
        }
        Ok(Index {
            lexical: InvertedIndex::from_postings(postings, meta.count),
            meta,
            dense,
            colbert,
        })
    }

    /// Passages in the index.
    pub fn len(&self) -> usize {
        self.meta.count
    }

    /// Whether the index holds no passage (never true of a loaded one).
    pub fn is_empty(&self) -> bool {
        self.meta.count == 0
    }

    /// The id of passage `p` (the corpus line's "id", else its 0-based position).
    pub fn id(&self, p: usize) -> &Value {
        &self.meta.ids[p]
    }

    /// The fingerprint of the model the index was built with.
    pub fn model(&self) -> &ModelFingerprint {
        &self.meta.model
    }

    /// Colbert rows of passage `p`.
    fn colbert_rows(&self, p: usize) -> Vec<Vec<f32>> {
        let d = self.meta.colbert_dim;
        (self.meta.colbert_offsets[p]..self.meta.colbert_offsets[p + 1])
            .map(|r| self.colbert[r * d..(r + 1) * d].to_vec())
            .collect()
    }

    /// The `top_k` passages for a query by the weighted hybrid, best first; candidates
    /// are the dense top-k ∪ lexical top-k (passages sharing a token with the query). The query's sizes must be the index's.
    pub fn search(&self, q: &Embedding, top_k: usize, w: Weights) -> anyhow::Result<Vec<Hit>> {
        let (Some(qd), Some(ql), Some(qc)) = (&q.dense, &q.lexical, &q.colbert) else {
            bail!("a query needs dense, lexical and colbert outputs");
        };
        let (dd, cd) = (self.meta.dense_dim, self.meta.colbert_dim);
        ensure!(
            qd.len() == dd && qc.iter().all(|r| r.len() == cd),
            "query vectors do not have the index's sizes (dense {dd}, colbert {cd})"
        );
        let dense: Vec<f32> = self.dense.chunks(dd).map(|p| score::dense(qd, p)).collect();
        let lexical = self.lexical.scores(ql);
        // Lexical candidates are what the inverted index reaches: passages sharing a token
        // with the query (a zero score is no match, whatever its position).
        let lexical_hits = score::top_k(&lexical, top_k)
            .into_iter()
            .filter(|&p| lexical[p] > 0.0);
        let candidates: BTreeSet<usize> = score::top_k(&dense, top_k)
            .into_iter()
            .chain(lexical_hits)
            .collect();
        let mut hits: Vec<Hit> = candidates
            .into_iter()
            .map(|p| Hit {
                passage: p,
                scores: score::combine(
                    dense[p],
                    lexical[p],
                    score::colbert(qc, &self.colbert_rows(p)),
                    w,
                ),
            })
            .collect();
        hits.sort_by(|a, b| {
            b.scores
                .all
                .total_cmp(&a.scores.all)
                .then(a.passage.cmp(&b.passage))
        });
        hits.truncate(top_k);
        Ok(hits)
    }
}
