//! An index held by Qdrant's in-process engine (`qdrant-edge`) in the index directory, in
//! the schema of [`super::schema`]; `m3-qdrant.json` beside Qdrant's files is m3's record
//! of it (format, model fingerprint, kept fields). Points are keyed by a UUID derived from
//! the passage id, so indexing the same corpus again (after a crash) overwrites or skips,
//! never duplicates.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use qdrant_edge::{
    Distance, EdgeConfig, EdgeConfigBuilder, EdgeOptimizersConfig, EdgeShard,
    EdgeSparseVectorParamsBuilder, EdgeVectorParamsBuilder, Expression, Formula, HnswIndexConfig,
    MultiVectorComparator, MultiVectorConfig, NamedQuery, PointId, PointInsertOperations,
    PointOperations, PointStruct, Prefetch, QueryEnum, QueryRequest, ScoringQuery, UpdateOperation,
    Vector, VectorInternal, VectorStructInternal, Vectors, WithPayloadInterface, WithVector,
};
use serde_json::Value;

use super::schema::{self, Meta, Mode, Parts};
use super::{Collection, Found, Passage, Retriever};
use crate::index::ModelFingerprint;
use crate::model::embedder::Embedding;
use crate::score::Weights;

/// The file that marks a directory as an m3 index held by Qdrant.
pub const META: &str = "m3-qdrant.json";

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
    PointId::Uuid(schema::point_uuid(id))
}

/// No HNSW graph for either dense vector: segments the optimizer seals are searched
/// exactly, as m3's own index is (and the fixture-size tests compare against brute force).
fn no_graph() -> HnswIndexConfig {
    HnswIndexConfig {
        m: 0,
        ef_construct: 100,
        full_scan_threshold: 10_000,
        max_indexing_threads: 0,
        on_disk: None,
        payload_m: None,
        inline_storage: None,
    }
}

/// Segments sealed at a fixed size and not merged afterwards. The appendable segment's
/// in-memory sparse posting lists cost O(list length) per insert (qdrant-edge 0.7 rewrites
/// every earlier entry's max-next-weight), so one segment of 10⁶ passages indexed in
/// quadratic time; sealed segments hold the compressed immutable index. Merging sealed
/// segments would rewrite them again and again, and exact search gains nothing from it.
fn sealing(segment_kb: usize) -> EdgeOptimizersConfig {
    EdgeOptimizersConfig {
        indexing_threshold: Some(segment_kb),
        max_segment_size: Some(segment_kb),
        default_segment_number: Some(16),
        ..Default::default()
    }
}

/// Size at which a segment is sealed.
const SEGMENT_KB: usize = 100_000;

fn config(model: &ModelFingerprint, segment_kb: usize) -> EdgeConfig {
    let colbert = EdgeVectorParamsBuilder::new(model.colbert_dim.max(1), Distance::Dot)
        .multivector_config(MultiVectorConfig {
            comparator: MultiVectorComparator::MaxSim,
        })
        .hnsw_config(no_graph())
        .build();
    EdgeConfigBuilder::new()
        .vector(
            Mode::Dense.name(),
            EdgeVectorParamsBuilder::new(model.dense_dim, Distance::Dot)
                .hnsw_config(no_graph())
                .build(),
        )
        .vector(Mode::Colbert.name(), colbert)
        .sparse_vector(
            Mode::Sparse.name(),
            EdgeSparseVectorParamsBuilder::new().build(),
        )
        .optimizers(sealing(segment_kb))
        .build()
}

fn read_meta(dir: &Path) -> anyhow::Result<Meta> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v: Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}: malformed", path.display()))?;
    Meta::from_json(v, &path.display().to_string())
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
        Self::create_or_resume_sealing_at(dir, model, keep, SEGMENT_KB)
    }

    /// [`Self::create_or_resume`] with segments sealed at `segment_kb`.
    fn create_or_resume_sealing_at(
        dir: &Path,
        model: &ModelFingerprint,
        keep: &[String],
        segment_kb: usize,
    ) -> anyhow::Result<Self> {
        let meta = if Self::is_one(dir) {
            let meta = read_meta(dir)?;
            meta.check_resume(model, keep, &dir.display().to_string())?;
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
            let meta = Meta::new(model, keep)?;
            // The marker first: a crash before the engine's files exist leaves a directory
            // that the next run resumes (the engine creates its files on load).
            crate::atomic::write_file(&dir.join(META), &serde_json::to_vec_pretty(&meta)?)?;
            meta
        };
        let shard = EdgeShard::load(dir, Some(config(&meta.model, segment_kb)))
            .map_err(|e| qerr(dir, e))?;
        Ok(QdrantIndex {
            dir: dir.to_path_buf(),
            shard,
            meta,
        })
    }

    /// Opens the index in `dir` for queries.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let meta = read_meta(dir)?;
        let shard = EdgeShard::load(dir, Some(config(&meta.model, SEGMENT_KB)))
            .map_err(|e| qerr(dir, e))?;
        Ok(QdrantIndex {
            dir: dir.to_path_buf(),
            shard,
            meta,
        })
    }
}

impl Collection for QdrantIndex {
    fn holds(&self, ids: &[Value]) -> anyhow::Result<Vec<bool>> {
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

    fn upsert(&self, passages: Vec<Passage>) -> anyhow::Result<()> {
        let mut points = Vec::with_capacity(passages.len());
        for p in &passages {
            let v = self.meta.passage_vectors(p)?;
            let mut named: Vec<(&str, Vector)> =
                vec![(Mode::Dense.name(), Vector::new_dense(v.dense.to_vec()))];
            // An empty sparse or colbert side is left out: the engine then scores it 0,
            // as m3's own scoring does.
            if !v.lexical.is_empty() {
                let (i, w): (Vec<u32>, Vec<f32>) = v.lexical.iter().copied().unzip();
                named.push((
                    Mode::Sparse.name(),
                    Vector::new_sparse(i, w).map_err(|e| qerr(&self.dir, e))?,
                ));
            }
            if !v.colbert.is_empty() {
                named.push((
                    Mode::Colbert.name(),
                    Vector::new_multi(v.colbert.to_vec()).map_err(|e| qerr(&self.dir, e))?,
                ));
            }
            points.push(
                PointStruct::new(
                    point_id(&p.id),
                    Vectors::new_named(named),
                    Value::Object(schema::payload(p)),
                )
                .into(),
            );
        }
        self.shard
            .update(UpdateOperation::PointOperation(
                PointOperations::UpsertPoints(PointInsertOperations::PointsList(points)),
            ))
            .map_err(|e| qerr(&self.dir, e))?;
        // Seals the appendable segment once it is full (see `sealing`).
        self.shard.optimize().map_err(|e| qerr(&self.dir, e))?;
        Ok(())
    }

    fn flush(&self) -> anyhow::Result<()> {
        self.shard.flush();
        Ok(())
    }

    fn place(&self) -> String {
        self.dir.display().to_string()
    }
}

fn nearest(mode: Mode, v: Vector) -> Option<ScoringQuery> {
    Some(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery::new(
        v.0,
        mode.name(),
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
    let dense = match named.remove(Mode::Dense.name()) {
        Some(VectorInternal::Dense(d)) => d,
        _ => Vec::new(),
    };
    let lexical = match named.remove(Mode::Sparse.name()) {
        Some(VectorInternal::Sparse(s)) => s.indices.into_iter().zip(s.values).collect(),
        _ => Vec::new(),
    };
    let colbert = match named.remove(Mode::Colbert.name()) {
        Some(VectorInternal::MultiDense(m)) => m.into_multi_vectors(),
        _ => Vec::new(),
    };
    schema::embedding(dense, lexical, colbert)
}

impl QdrantIndex {
    /// Passages held.
    pub fn count(&self) -> anyhow::Result<usize> {
        self.shard
            .count(qdrant_edge::CountRequest {
                filter: None,
                exact: true,
            })
            .map_err(|e| qerr(&self.dir, e))
    }

    /// SPEC §4 in the engine: dense top-k and sparse top-k, their union (at most 2k points)
    /// rescored by each mode and ranked by [`schema::formula_terms`]. The whole union comes
    /// back with its vectors; each point with the engine's score, its corpus position and
    /// m3's scores computed on its vectors.
    fn union(
        &self,
        q: &Embedding,
        top_k: usize,
        w: Weights,
    ) -> anyhow::Result<Vec<(f32, u64, Found)>> {
        let qv = self.meta.query_vectors(q)?;
        if top_k == 0 {
            return Ok(Vec::new());
        }
        let vector = |mode: Mode, v: Parts<'_>| -> anyhow::Result<Vector> {
            Ok(match mode {
                Mode::Dense => Vector::new_dense(v.dense.to_vec()),
                Mode::Sparse => {
                    let (i, w): (Vec<u32>, Vec<f32>) = v.lexical.iter().copied().unzip();
                    Vector::new_sparse(i, w).map_err(|e| qerr(&self.dir, e))?
                }
                Mode::Colbert => {
                    Vector::new_multi(v.colbert.to_vec()).map_err(|e| qerr(&self.dir, e))?
                }
            })
        };
        let mut leaves = vec![prefetch(
            Vec::new(),
            nearest(Mode::Dense, vector(Mode::Dense, qv)?),
            top_k,
        )];
        if !qv.lexical.is_empty() {
            let s = vector(Mode::Sparse, qv)?;
            leaves.push(prefetch(Vec::new(), nearest(Mode::Sparse, s), top_k));
        }
        let union = schema::union_limit(top_k);
        let terms = schema::formula_terms(qv, w);
        let formula = Formula {
            formula: Expression::Sum(
                (0..terms.len())
                    .map(|i| {
                        Expression::Mult(vec![
                            Expression::Constant(terms[i].1),
                            Expression::Variable(format!("$score[{i}]")),
                        ])
                    })
                    .collect(),
            ),
            defaults: HashMap::new(),
        }
        .try_into()
        .map_err(|e| qerr(&self.dir, e))?;
        let mut prefetches = Vec::with_capacity(terms.len());
        for &(mode, _) in &terms {
            let query = nearest(mode, vector(mode, qv)?);
            prefetches.push(prefetch(leaves.clone(), query, union));
        }
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
        let what = self.dir.display().to_string();
        let mut found = Vec::with_capacity(points.len());
        for p in points {
            let payload = p.payload.map(|p| p.0).unwrap_or_default();
            let (pos, f) = schema::candidate(qv, payload, &unpack(p.vector), w, &what)?;
            found.push((p.score, pos, f));
        }
        Ok(found)
    }
}

impl Retriever for QdrantIndex {
    fn search(&self, q: &Embedding, top_k: usize, w: Weights) -> anyhow::Result<Vec<Found>> {
        let found = self.union(q, top_k, w)?;
        Ok(schema::rank(
            found.into_iter().map(|(_, pos, f)| (pos, f)).collect(),
            top_k,
        ))
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
    use serde_json::Map;
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
    fn sealed_segments_answer_as_m3_s_own_index() {
        use crate::index::{Index, IndexWriter};
        use crate::rng::Rng;
        let dir = std::env::temp_dir().join(format!("m3-qdrant-{}-sealed", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let model = ModelFingerprint {
            dense_dim: 16,
            colbert_dim: 8,
            vocab_size: 40,
            files: BTreeMap::new(),
        };
        let ix = QdrantIndex::create_or_resume_sealing_at(&dir, &model, &[], 8).unwrap();
        let mut rng = Rng::new(7);
        let mut random = |terms: usize, rows: usize| {
            let mut l: Vec<(u32, f32)> = (0..terms)
                .map(|_| (rng.below(40), rng.uniform(0.01, 1.0)))
                .collect();
            l.sort_by_key(|e| e.0);
            l.dedup_by_key(|e| e.0);
            let rows: Vec<Vec<f32>> = (0..rows).map(|_| unit(&rng.vec(8, -1.0, 1.0))).collect();
            Embedding {
                dense: Some(unit(&rng.vec(16, -1.0, 1.0))),
                lexical: Some(l),
                colbert: Some(rows),
            }
        };
        let passages: Vec<Embedding> = (0..1200).map(|_| random(6, 3)).collect();
        let mut own = IndexWriter::new(model.clone());
        for (i, chunk) in passages.chunks(100).enumerate() {
            let batch = chunk
                .iter()
                .enumerate()
                .map(|(j, e)| Passage {
                    id: Value::from(i * 100 + j),
                    pos: (i * 100 + j) as u64,
                    embedding: e.clone(),
                    fields: Map::new(),
                })
                .collect();
            ix.upsert(batch).unwrap();
        }
        for (i, e) in passages.iter().enumerate() {
            own.add(Value::from(i), e, "p").unwrap();
        }
        ix.flush().unwrap();
        // Vectors of 1200 passages fill ~100 KB: the engine sealed several segments.
        let segments = std::fs::read_dir(dir.join("segments")).unwrap().count();
        assert!(segments > 3, "{segments} segments");
        let own_dir = dir.with_extension("own");
        let _ = std::fs::remove_dir_all(&own_dir);
        own.write(&own_dir).unwrap();
        let own = Index::load(&own_dir).unwrap();
        assert_eq!(ix.count().unwrap(), 1200);
        for _ in 0..20 {
            let q = random(4, 2);
            let (a, b) = (
                Retriever::search(&ix, &q, 10, Weights::default()).unwrap(),
                Retriever::search(&own, &q, 10, Weights::default()).unwrap(),
            );
            let key = |f: &Found| (f.id.clone(), f.scores.all.to_bits());
            assert_eq!(
                a.iter().map(key).collect::<Vec<_>>(),
                b.iter().map(key).collect::<Vec<_>>()
            );
        }
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
