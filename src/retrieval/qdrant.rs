//! An index held by Qdrant's in-process engine (`qdrant-edge`) in the index directory:
//! one point per passage with three named vectors, `dense` (dot product of unit vectors,
//! i.e. cosine), `sparse` (token id → weight, dot product) and `colbert` (multivector,
//! MAX_SIM), and a payload of the passage id, its corpus position and the corpus fields
//! asked to be kept. `m3-qdrant.json` beside Qdrant's files records the model's
//! fingerprint. Points are keyed by a UUID derived from the passage id, so indexing the
//! same corpus again (after a crash) overwrites or skips, never duplicates.
//!
//! Vectors are stored with the dot product rather than Qdrant's cosine: m3's dense and
//! colbert vectors are unit length already, so the scores are the cosine's, and the stored
//! vectors stay bit-identical to what the model produced (cosine would renormalise them).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use qdrant_edge::{
    Distance, EdgeConfig, EdgeConfigBuilder, EdgeShard, EdgeSparseVectorParamsBuilder,
    EdgeVectorParamsBuilder, Expression, Formula, MultiVectorComparator, MultiVectorConfig,
    NamedQuery, PointId, PointInsertOperations, PointOperations, PointStruct, Prefetch, QueryEnum,
    QueryRequest, ScoringQuery, UpdateOperation, Vector, VectorInternal, VectorStructInternal,
    Vectors, WithPayloadInterface, WithVector,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Found, Retriever};
use crate::index::ModelFingerprint;
use crate::model::embedder::Embedding;
use crate::score::{self, Weights};

/// The file that marks a directory as an m3 index held by Qdrant.
pub const META: &str = "m3-qdrant.json";
/// The format this code writes and reads.
pub const FORMAT: &str = "m3-qdrant/1";
/// Payload keys m3 itself writes (a kept corpus field may not use them).
pub const RESERVED: [&str; 2] = ["id", "pos"];

// Passage ids become UUIDs under this namespace (v5: SHA-1 of the id's JSON), so the same
// id is the same point in every run and on every engine.
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d33_2d71_6472_616e_742d_7061_7373_6167);

/// `m3-qdrant.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    format: String,
    model: ModelFingerprint,
    /// Corpus fields kept in each point's payload.
    keep: Vec<String>,
}

/// One passage to upsert.
pub struct Passage {
    /// The corpus line's id, else its 0-based position.
    pub id: Value,
    /// Its 0-based position in the corpus (ranks ties, as m3's own index does).
    pub pos: u64,
    /// Its embedding (dense, lexical and colbert).
    pub embedding: Embedding,
    /// The corpus fields to keep.
    pub fields: Map<String, Value>,
}

/// An m3 index in Qdrant's in-process engine.
pub struct QdrantIndex {
    dir: PathBuf,
    shard: EdgeShard,
    meta: Meta,
}

fn qerr(dir: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{}: qdrant: {e}", dir.display())
}

/// The Qdrant point id of passage id `id`.
pub fn point_id(id: &Value) -> PointId {
    let key = serde_json::to_string(id).expect("a JSON value serialises");
    PointId::Uuid(uuid::Uuid::new_v5(&NAMESPACE, key.as_bytes()))
}

fn config(model: &ModelFingerprint) -> EdgeConfig {
    let colbert = EdgeVectorParamsBuilder::new(model.colbert_dim.max(1), Distance::Dot)
        .multivector_config(MultiVectorConfig {
            comparator: MultiVectorComparator::MaxSim,
        })
        .build();
    EdgeConfigBuilder::new()
        .vector(
            "dense",
            EdgeVectorParamsBuilder::new(model.dense_dim, Distance::Dot).build(),
        )
        .vector("colbert", colbert)
        .sparse_vector("sparse", EdgeSparseVectorParamsBuilder::new().build())
        .build()
}

fn read_meta(dir: &Path) -> anyhow::Result<Meta> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v: Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}: malformed", path.display()))?;
    let format = v.get("format").and_then(Value::as_str).unwrap_or("");
    ensure!(
        format == FORMAT,
        "{}: index format {format:?}, this m3 reads {FORMAT:?}: rebuild it with m3 search index",
        path.display()
    );
    serde_json::from_value(v).with_context(|| format!("{}: malformed", path.display()))
}

impl QdrantIndex {
    /// Whether `dir` holds an m3 index in Qdrant.
    pub fn is_one(dir: &Path) -> bool {
        dir.join(META).is_file()
    }

    /// Creates the index in `dir` (absent or empty), or reopens the one there to go on
    /// indexing into it, refusing one built with another model or other kept fields.
    pub fn create_or_resume(
        dir: &Path,
        model: &ModelFingerprint,
        keep: &[String],
    ) -> anyhow::Result<Self> {
        for k in keep {
            ensure!(
                !RESERVED.contains(&k.as_str()),
                "--keep {k}: m3 writes that payload key itself"
            );
        }
        let meta = if Self::is_one(dir) {
            let meta = read_meta(dir)?;
            let d = meta.model.differences(model);
            ensure!(
                d.is_empty(),
                "{}: the index was built with another model: {}; index into a new directory \
                 or use that model",
                dir.display(),
                d.join(", ")
            );
            ensure!(
                meta.keep == keep,
                "{}: the index keeps the fields {:?}, not {keep:?}; index with the same --keep \
                 or into a new directory",
                dir.display(),
                meta.keep
            );
            meta
        } else {
            if dir.exists() {
                // A run killed while writing the marker leaves only the marker's temporary
                // file: that directory is ours and still empty.
                let half_marker = crate::atomic::write_file_temp(&dir.join(META));
                let entries = std::fs::read_dir(dir)
                    .with_context(|| format!("{}: cannot read", dir.display()))?
                    .collect::<std::io::Result<Vec<_>>>()
                    .with_context(|| format!("{}: cannot read", dir.display()))?;
                ensure!(
                    entries.iter().all(|e| e.path() == half_marker),
                    "{}: holds files and is not an m3 index; index into a new or empty \
                     directory",
                    dir.display()
                );
                if half_marker.exists() {
                    std::fs::remove_file(&half_marker).with_context(|| {
                        format!("{}: cannot remove leftover", half_marker.display())
                    })?;
                }
            }
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create", dir.display()))?;
            let meta = Meta {
                format: FORMAT.into(),
                model: model.clone(),
                keep: keep.to_vec(),
            };
            // The marker first: a crash before the engine's files exist leaves a directory
            // that the next run resumes (the engine creates its files on load).
            crate::atomic::write_file(&dir.join(META), &serde_json::to_vec_pretty(&meta)?)?;
            meta
        };
        let shard = EdgeShard::load(dir, Some(config(&meta.model))).map_err(|e| qerr(dir, e))?;
        Ok(QdrantIndex {
            dir: dir.to_path_buf(),
            shard,
            meta,
        })
    }

    /// Opens the index in `dir` for queries.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let meta = read_meta(dir)?;
        let shard = EdgeShard::load(dir, Some(config(&meta.model))).map_err(|e| qerr(dir, e))?;
        Ok(QdrantIndex {
            dir: dir.to_path_buf(),
            shard,
            meta,
        })
    }

    /// Which of `ids` the index already holds.
    pub fn holds(&self, ids: &[Value]) -> anyhow::Result<Vec<bool>> {
        let points: Vec<PointId> = ids.iter().map(point_id).collect();
        let found: HashSet<PointId> = self
            .shard
            .retrieve(
                &points,
                Some(WithPayloadInterface::Bool(false)),
                Some(WithVector::Bool(false)),
            )
            .map_err(|e| qerr(&self.dir, e))?
            .into_iter()
            .map(|r| r.id)
            .collect();
        Ok(points.iter().map(|p| found.contains(p)).collect())
    }

    /// Writes `passages` (a passage already held is replaced whole).
    pub fn upsert(&self, passages: Vec<Passage>) -> anyhow::Result<()> {
        let (dd, cd) = (self.meta.model.dense_dim, self.meta.model.colbert_dim);
        let mut points = Vec::with_capacity(passages.len());
        for p in passages {
            let e = &p.embedding;
            let (Some(d), Some(l), Some(c)) = (&e.dense, &e.lexical, &e.colbert) else {
                bail!("passage {}: needs dense, lexical and colbert outputs", p.id);
            };
            ensure!(
                d.len() == dd && c.iter().all(|r| r.len() == cd),
                "passage {}: vectors are not the index's sizes (dense {dd}, colbert {cd})",
                p.id
            );
            let mut named: Vec<(&str, Vector)> = vec![("dense", Vector::new_dense(d.clone()))];
            // An empty sparse or colbert side is left out: the engine then scores it 0,
            // as m3's own scoring does.
            if !l.is_empty() {
                let (i, w): (Vec<u32>, Vec<f32>) = l.iter().copied().unzip();
                named.push((
                    "sparse",
                    Vector::new_sparse(i, w).map_err(|e| qerr(&self.dir, e))?,
                ));
            }
            if !c.is_empty() {
                named.push((
                    "colbert",
                    Vector::new_multi(c.clone()).map_err(|e| qerr(&self.dir, e))?,
                ));
            }
            let mut payload = p.fields;
            payload.insert("id".into(), p.id.clone());
            payload.insert("pos".into(), Value::from(p.pos));
            points.push(
                PointStruct::new(
                    point_id(&p.id),
                    Vectors::new_named(named),
                    Value::Object(payload),
                )
                .into(),
            );
        }
        self.shard
            .update(UpdateOperation::PointOperation(
                PointOperations::UpsertPoints(PointInsertOperations::PointsList(points)),
            ))
            .map_err(|e| qerr(&self.dir, e))
    }

    /// Writes everything upserted so far to disk.
    pub fn flush(&self) {
        self.shard.flush();
    }

    /// Passages held.
    pub fn count(&self) -> anyhow::Result<usize> {
        self.shard
            .count(qdrant_edge::CountRequest {
                filter: None,
                exact: true,
            })
            .map_err(|e| qerr(&self.dir, e))
    }
}

fn nearest(name: &str, v: Vector) -> Option<ScoringQuery> {
    Some(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery::new(
        v.0, name,
    ))))
}

fn prefetch(prefetches: Vec<Prefetch>, query: Option<ScoringQuery>, limit: usize) -> Prefetch {
    Prefetch {
        prefetches,
        query,
        limit,
        params: None,
        filter: None,
        score_threshold: None,
    }
}

/// A point's vectors as an m3 embedding (an absent side empty).
fn unpack(v: Option<VectorStructInternal>) -> Embedding {
    let mut named = match v {
        Some(VectorStructInternal::Named(m)) => m,
        _ => HashMap::new(),
    };
    let dense = match named.remove("dense") {
        Some(VectorInternal::Dense(d)) => d,
        _ => Vec::new(),
    };
    let lexical = match named.remove("sparse") {
        Some(VectorInternal::Sparse(s)) => s.indices.into_iter().zip(s.values).collect(),
        _ => Vec::new(),
    };
    let colbert = match named.remove("colbert") {
        Some(VectorInternal::MultiDense(m)) => m.into_multi_vectors(),
        _ => Vec::new(),
    };
    Embedding {
        dense: Some(dense),
        lexical: Some(lexical),
        colbert: Some(colbert),
    }
}

impl QdrantIndex {
    /// SPEC §4 in the engine: dense top-k and sparse top-k, their union (at most 2k points)
    /// rescored by each mode and ranked by the weighted formula (colbert's MAX_SIM is a sum
    /// over query rows, m3's score their mean, hence the 1/rows). The whole union comes
    /// back with its vectors; each point with the engine's score, its corpus position and
    /// m3's scores computed by [`score`] on its vectors.
    fn union(
        &self,
        q: &Embedding,
        top_k: usize,
        w: Weights,
    ) -> anyhow::Result<Vec<(f32, u64, Found)>> {
        let (Some(qd), Some(ql), Some(qc)) = (&q.dense, &q.lexical, &q.colbert) else {
            bail!("a query needs dense, lexical and colbert outputs");
        };
        let (dd, cd) = (self.meta.model.dense_dim, self.meta.model.colbert_dim);
        ensure!(
            qd.len() == dd && qc.iter().all(|r| r.len() == cd),
            "query vectors do not have the index's sizes (dense {dd}, colbert {cd})"
        );
        if top_k == 0 {
            return Ok(Vec::new());
        }
        let dense = || Vector::new_dense(qd.clone());
        let (qi, qw): (Vec<u32>, Vec<f32>) = ql.iter().copied().unzip();
        let sparse = || Vector::new_sparse(qi.clone(), qw.clone());
        let mut leaves = vec![prefetch(Vec::new(), nearest("dense", dense()), top_k)];
        if !ql.is_empty() {
            let s = sparse().map_err(|e| qerr(&self.dir, e))?;
            leaves.push(prefetch(Vec::new(), nearest("sparse", s), top_k));
        }
        let union = 2 * top_k;
        let total = w.dense + w.sparse + w.colbert;
        let mut modes = vec![(nearest("dense", dense()), w.dense / total)];
        if !ql.is_empty() {
            let s = sparse().map_err(|e| qerr(&self.dir, e))?;
            modes.push((nearest("sparse", s), w.sparse / total));
        }
        if !qc.is_empty() {
            let c = Vector::new_multi(qc.clone()).map_err(|e| qerr(&self.dir, e))?;
            modes.push((nearest("colbert", c), w.colbert / total / qc.len() as f32));
        }
        let terms = (0..modes.len())
            .map(|i| {
                Expression::Mult(vec![
                    Expression::Constant(modes[i].1),
                    Expression::Variable(format!("$score[{i}]")),
                ])
            })
            .collect();
        let formula = Formula {
            formula: Expression::Sum(terms),
            defaults: HashMap::new(),
        }
        .try_into()
        .map_err(|e| qerr(&self.dir, e))?;
        let prefetches = modes
            .into_iter()
            .map(|(query, _)| prefetch(leaves.clone(), query, union))
            .collect();
        let points = self
            .shard
            .query(QueryRequest {
                prefetches,
                query: Some(ScoringQuery::Formula(formula)),
                filter: None,
                score_threshold: None,
                limit: union,
                offset: 0,
                params: None,
                with_vector: WithVector::Bool(true),
                with_payload: WithPayloadInterface::Bool(true),
            })
            .map_err(|e| qerr(&self.dir, e))?;
        let mut found = Vec::with_capacity(points.len());
        for p in points {
            let mut payload = p.payload.map(|p| p.0).unwrap_or_default();
            let (Some(id), Some(pos)) = (
                payload.remove("id"),
                payload.remove("pos").and_then(|v| v.as_u64()),
            ) else {
                bail!(
                    "{}: a point without its m3 id and position",
                    self.dir.display()
                );
            };
            let e = unpack(p.vector);
            let (pd, pl, pc) = (e.dense.unwrap(), e.lexical.unwrap(), e.colbert.unwrap());
            let scores = score::combine(
                score::dense(qd, &pd),
                score::lexical(ql, &pl),
                score::colbert(qc, &pc),
                w,
            );
            found.push((
                p.score,
                pos,
                Found {
                    id,
                    scores,
                    fields: payload,
                },
            ));
        }
        Ok(found)
    }
}

impl Retriever for QdrantIndex {
    /// The union's order by m3's own arithmetic (ties by corpus position), so results
    /// equal m3's own index on the same corpus; the engine's formula ranks the same way up
    /// to rounding.
    fn search(&self, q: &Embedding, top_k: usize, w: Weights) -> anyhow::Result<Vec<Found>> {
        let mut found = self.union(q, top_k, w)?;
        found.sort_by(|(_, pa, a), (_, pb, b)| {
            b.scores.all.total_cmp(&a.scores.all).then(pa.cmp(pb))
        });
        found.truncate(top_k);
        Ok(found.into_iter().map(|(_, _, f)| f).collect())
    }

    fn model(&self) -> &ModelFingerprint {
        &self.meta.model
    }

    fn passages(&self) -> anyhow::Result<usize> {
        self.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn emb(d: &[f32], l: &[(u32, f32)], c: &[&[f32]]) -> Embedding {
        Embedding {
            dense: Some(unit(d)),
            lexical: Some(l.to_vec()),
            colbert: Some(c.iter().map(|r| unit(r)).collect()),
        }
    }

    fn index(name: &str) -> QdrantIndex {
        let dir = std::env::temp_dir().join(format!("m3-qdrant-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let model = ModelFingerprint {
            dense_dim: 3,
            colbert_dim: 2,
            vocab_size: 10,
            files: BTreeMap::new(),
        };
        QdrantIndex::create_or_resume(&dir, &model, &[]).unwrap()
    }

    fn put(ix: &QdrantIndex, ps: Vec<Embedding>) {
        let passages = ps
            .into_iter()
            .enumerate()
            .map(|(i, embedding)| Passage {
                id: Value::from(format!("p{i}")),
                pos: i as u64,
                embedding,
                fields: Map::new(),
            })
            .collect();
        ix.upsert(passages).unwrap();
    }

    #[test]
    fn the_engine_s_formula_is_m3_s_hybrid_and_lexical_candidates_share_a_token() {
        let ix = index("formula");
        put(
            &ix,
            vec![
                emb(&[1.0, 0.0, 0.0], &[(1, 0.5)], &[&[1.0, 0.0], &[0.0, 1.0]]),
                emb(&[0.0, 1.0, 0.0], &[(2, 0.9), (3, 0.2)], &[&[0.6, 0.8]]),
                emb(&[0.7, 0.7, 0.1], &[(3, 0.4)], &[]),
                emb(&[0.0, 0.0, 1.0], &[], &[&[-1.0, 0.2]]),
                emb(&[0.2, 0.1, 1.0], &[(7, 0.3)], &[&[0.1, 1.0], &[1.0, 0.1]]),
            ],
        );
        assert_eq!(ix.count().unwrap(), 5);
        let q = emb(
            &[0.9, 0.3, 0.1],
            &[(3, 1.0), (9, 0.5)],
            &[&[1.0, 0.2], &[0.3, 1.0]],
        );
        let w = Weights {
            dense: 0.5,
            sparse: 0.3,
            colbert: 0.2,
        };
        let union = ix.union(&q, 1, w).unwrap();
        // Dense top-1 is p0, lexical top-1 p2 (token 3, 0.4 > 0.2).
        let mut ids: Vec<String> = union.iter().map(|(_, _, f)| f.id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["\"p0\"", "\"p2\""]);
        let union = ix.union(&q, 2, w).unwrap();
        let mut ids: Vec<String> = union.iter().map(|(_, _, f)| f.id.to_string()).collect();
        ids.sort();
        // Dense top-2 {p0, p2}; lexical: only p1 and p2 share a token with the query, though
        // the others have a lexical score too (0).
        assert_eq!(ids, ["\"p0\"", "\"p1\"", "\"p2\""]);
        for (engine, _, f) in &union {
            assert!(
                (engine - f.scores.all).abs() < 1e-5,
                "{}: engine {engine}, m3 {:?}",
                f.id,
                f.scores
            );
        }
        // An empty query side is scored 0, as m3 scores it.
        let q = emb(&[0.0, 0.0, 1.0], &[], &[]);
        let hits = ix.search(&q, 5, w).unwrap();
        assert_eq!(hits.len(), 5);
        assert!(hits
            .iter()
            .all(|h| h.scores.sparse == 0.0 && h.scores.colbert == 0.0));
        assert_eq!(hits[0].id, Value::from("p3"));
    }
}
