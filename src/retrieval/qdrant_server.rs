//! An index held by a Qdrant server or cluster, through the official client
//! (`qdrant-client`, gRPC, port 6334 by default): one collection in the schema of
//! [`super::schema`], the same points and the same query as the in-process engine, so a
//! corpus indexed locally and one indexed into a cluster answer the same queries the same
//! way (up to HNSW: a server builds an approximate graph for `dense` once a segment is
//! large, and [`Server::exact`] asks it to search exactly instead). m3's record of the
//! index (format, model fingerprint, kept fields) is the collection's metadata under
//! `"m3"`, which needs Qdrant 1.16 or later.
//!
//! The client is asynchronous; this engine owns a small runtime of its own and blocks on
//! it, so callers stay synchronous (a caller inside another runtime must call from a
//! blocking thread, as `m3 serve` does).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use qdrant_client::qdrant::point_id::PointIdOptions;
use qdrant_client::qdrant::vector_output::Vector as OutVector;
use qdrant_client::qdrant::vectors_output::VectorsOptions;
use qdrant_client::qdrant::{
    CountPointsBuilder, CreateCollectionBuilder, Distance, Expression, FormulaBuilder,
    GetPointsBuilder, HnswConfigDiffBuilder, MultiVectorComparator, MultiVectorConfigBuilder,
    NamedVectors, PointId, PointStruct, PrefetchQuery, PrefetchQueryBuilder, Query,
    QueryPointsBuilder, SearchParamsBuilder, SparseVectorParamsBuilder, SparseVectorsConfigBuilder,
    UpsertPointsBuilder, Vector, VectorInput, VectorParamsBuilder, VectorsConfigBuilder,
    VectorsOutput,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use serde_json::{Map, Value};

use super::schema::{self, Meta, Mode, Parts};
use super::{Collection, Found, Passage, Retriever};
use crate::index::ModelFingerprint;
use crate::model::embedder::Embedding;
use crate::score::Weights;

/// The metadata key under which the collection holds m3's record.
pub const META_KEY: &str = "m3";
/// Largest upsert request sent at once: Qdrant refuses gRPC requests over its
/// `service.max_request_size_mb` (32 MB by default), and colbert rows make passages large.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// Where the collection is and how to reach it.
#[derive(Debug, Clone)]
pub struct Server {
    /// The server's gRPC URL, e.g. `http://localhost:6334`.
    pub url: String,
    /// The collection's name.
    pub collection: String,
    /// Qdrant's API key, if the server asks for one.
    pub api_key: Option<String>,
    /// Timeout of each request.
    pub timeout: Duration,
    /// Dense candidates by exact search rather than the server's HNSW graph.
    pub exact: bool,
}

/// How a new collection is laid out across a cluster (ignored when resuming one).
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout {
    /// Shards (the server's default if `None`).
    pub shards: Option<u32>,
    /// Copies of each shard (the server's default if `None`).
    pub replicas: Option<u32>,
}

/// An m3 index in a collection of a Qdrant server or cluster.
pub struct QdrantServer {
    // Always `Some` but in `drop`, which shuts the runtime down without blocking (a
    // runtime dropped inside another runtime's task would panic).
    rt: Option<tokio::runtime::Runtime>,
    client: Qdrant,
    server: Server,
    meta: Meta,
}

impl Drop for QdrantServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The client's error without gRPC's metadata dump.
fn describe(e: &QdrantError) -> String {
    match e {
        QdrantError::ResponseError { status } => {
            format!("{:?}: {}", status.code(), status.message())
        }
        QdrantError::ResourceExhaustedError {
            status,
            retry_after_seconds,
        } => format!(
            "resource exhausted: {} (retry after {retry_after_seconds} s)",
            status.message()
        ),
        e => e.to_string(),
    }
}

fn block_on<F: Future>(rt: &tokio::runtime::Runtime, f: F) -> F::Output {
    rt.block_on(f)
}

impl Server {
    /// `collection NAME at URL`, for messages.
    pub fn place(&self) -> String {
        format!("collection {:?} at {}", self.collection, self.url)
    }

    fn err(&self, e: QdrantError) -> anyhow::Error {
        anyhow::anyhow!("{}: qdrant: {}", self.place(), describe(&e))
    }

    /// A runtime and a client that has answered a health check.
    fn connect(&self) -> anyhow::Result<(tokio::runtime::Runtime, Qdrant)> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("m3-qdrant")
            .enable_all()
            .build()
            .context("cannot start the Qdrant client's runtime")?;
        // The client's own compatibility check prints; m3's library does not.
        let client = Qdrant::from_url(&self.url)
            .api_key(self.api_key.clone())
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .skip_compatibility_check()
            .build()
            .map_err(|e| self.err(e))?;
        block_on(&rt, client.health_check()).map_err(|e| {
            anyhow::anyhow!(
                "cannot reach Qdrant at {} (gRPC, port 6334 by default): {}",
                self.url,
                describe(&e)
            )
        })?;
        Ok((rt, client))
    }

    /// m3's record in the collection's metadata, or `None` if the collection is absent.
    fn read_meta(
        &self,
        rt: &tokio::runtime::Runtime,
        client: &Qdrant,
    ) -> anyhow::Result<Option<Meta>> {
        let exists =
            block_on(rt, client.collection_exists(&self.collection)).map_err(|e| self.err(e))?;
        if !exists {
            return Ok(None);
        }
        let info =
            block_on(rt, client.collection_info(&self.collection)).map_err(|e| self.err(e))?;
        let mut metadata = info
            .result
            .and_then(|i| i.config)
            .map(|c| c.metadata)
            .unwrap_or_default();
        let Some(v) = metadata.remove(META_KEY) else {
            bail!(
                "{}: exists and is not an m3 index (no {META_KEY:?} in its metadata); index into \
                 a new collection",
                self.place()
            );
        };
        Meta::from_json(v.into_json(), &self.place()).map(Some)
    }
}

/// The collection m3 creates for `meta`: the schema's three named vectors, colbert kept
/// out of HNSW (it only re-ranks candidates, as Qdrant recommends for multivectors).
fn create_request(
    s: &Server,
    meta: &Meta,
    layout: Layout,
) -> anyhow::Result<CreateCollectionBuilder> {
    let (dd, cd) = (
        meta.model.dense_dim as u64,
        meta.model.colbert_dim.max(1) as u64,
    );
    let mut vectors = VectorsConfigBuilder::default();
    vectors.add_named_vector_params(
        Mode::Dense.name(),
        VectorParamsBuilder::new(dd, Distance::Dot),
    );
    vectors.add_named_vector_params(
        Mode::Colbert.name(),
        VectorParamsBuilder::new(cd, Distance::Dot)
            .multivector_config(MultiVectorConfigBuilder::new(MultiVectorComparator::MaxSim))
            .hnsw_config(HnswConfigDiffBuilder::default().m(0)),
    );
    let mut sparse = SparseVectorsConfigBuilder::default();
    sparse.add_named_vector_params(Mode::Sparse.name(), SparseVectorParamsBuilder::default());
    let record = HashMap::from([(META_KEY.to_string(), serde_json::to_value(meta)?)]);
    let mut b = CreateCollectionBuilder::new(&s.collection)
        .vectors_config(vectors)
        .sparse_vectors_config(sparse)
        .metadata(record);
    if let Some(n) = layout.shards {
        b = b.shard_number(n);
    }
    if let Some(n) = layout.replicas {
        b = b.replication_factor(n);
    }
    Ok(b)
}

impl QdrantServer {
    /// Opens the collection for queries: it must exist and be an m3 index.
    pub fn open(server: &Server) -> anyhow::Result<Self> {
        let (rt, client) = server.connect()?;
        let Some(meta) = server.read_meta(&rt, &client)? else {
            bail!(
                "{}: no such collection; make it with m3 search index --qdrant-url {} \
                 --collection {}",
                server.place(),
                server.url,
                server.collection
            );
        };
        Ok(QdrantServer {
            rt: Some(rt),
            client,
            server: server.clone(),
            meta,
        })
    }

    /// Creates the collection (laid out by `layout`), or reopens the m3 index it is to go
    /// on indexing into it, refusing one built with another model or other kept fields.
    pub fn create_or_resume(
        server: &Server,
        model: &ModelFingerprint,
        keep: &[String],
        layout: Layout,
    ) -> anyhow::Result<Self> {
        let (rt, client) = server.connect()?;
        let meta = match server.read_meta(&rt, &client)? {
            Some(meta) => {
                meta.check_resume(model, keep, &server.place())?;
                meta
            }
            None => {
                let meta = Meta::new(model, keep)?;
                block_on(
                    &rt,
                    client.create_collection(create_request(server, &meta, layout)?),
                )
                .map_err(|e| server.err(e))?;
                // A server older than collection metadata accepts the request and drops
                // the record; the collection would then be unreadable as an m3 index.
                match server.read_meta(&rt, &client) {
                    Ok(Some(back)) if back == meta => {}
                    _ => bail!(
                        "{}: the server did not keep m3's record in the collection's metadata \
                         (Qdrant 1.16 or later keeps it); the empty collection was left there",
                        server.place()
                    ),
                }
                meta
            }
        };
        Ok(QdrantServer {
            rt: Some(rt),
            client,
            server: server.clone(),
            meta,
        })
    }

    fn run<F: Future>(&self, f: F) -> F::Output {
        block_on(self.rt.as_ref().expect("the runtime lives until drop"), f)
    }

    /// Passages held.
    pub fn count(&self) -> anyhow::Result<usize> {
        let r = self
            .run(
                self.client
                    .count(CountPointsBuilder::new(&self.server.collection).exact(true)),
            )
            .map_err(|e| self.server.err(e))?;
        Ok(r.result.map_or(0, |c| c.count as usize))
    }
}

fn point_id(id: &Value) -> PointId {
    PointId::from(schema::point_uuid(id).to_string())
}

/// A point for passage `p` (an empty sparse or colbert side left out: the engine then
/// scores it 0, as m3 does), and the bytes it adds to a request, roughly.
fn point(p: &Passage, v: Parts<'_>) -> (PointStruct, usize) {
    let mut named =
        NamedVectors::default().add_vector(Mode::Dense.name(), Vector::new_dense(v.dense.to_vec()));
    if !v.lexical.is_empty() {
        let (i, w): (Vec<u32>, Vec<f32>) = v.lexical.iter().copied().unzip();
        named = named.add_vector(Mode::Sparse.name(), Vector::new_sparse(i, w));
    }
    if !v.colbert.is_empty() {
        named = named.add_vector(Mode::Colbert.name(), Vector::new_multi(v.colbert.to_vec()));
    }
    let payload = schema::payload(p);
    let bytes = 4
        * (v.dense.len() + 2 * v.lexical.len() + v.colbert.iter().map(Vec::len).sum::<usize>())
        + serde_json::to_string(&payload).map_or(0, |s| s.len())
        + 64;
    (
        PointStruct::new(point_id(&p.id), named, Payload::from(payload)),
        bytes,
    )
}

/// Consecutive runs of items whose sizes sum to at most `limit` (an item larger than the
/// limit alone in its run).
pub fn runs_within(sizes: &[usize], limit: usize) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let (mut start, mut sum) = (0, 0);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && sum + s > limit {
            runs.push(start..i);
            (start, sum) = (i, 0);
        }
        sum += s;
    }
    if start < sizes.len() {
        runs.push(start..sizes.len());
    }
    runs
}

impl Collection for QdrantServer {
    fn holds(&self, ids: &[Value]) -> anyhow::Result<Vec<bool>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let points: Vec<PointId> = ids.iter().map(point_id).collect();
        let r = self
            .run(
                self.client.get_points(
                    GetPointsBuilder::new(&self.server.collection, points.clone())
                        .with_payload(false)
                        .with_vectors(false),
                ),
            )
            .map_err(|e| self.server.err(e))?;
        let uuid = |p: &PointId| match &p.point_id_options {
            Some(PointIdOptions::Uuid(s)) => Some(s.to_ascii_lowercase()),
            _ => None,
        };
        let found: HashSet<String> = r
            .result
            .iter()
            .filter_map(|p| p.id.as_ref().and_then(uuid))
            .collect();
        Ok(points
            .iter()
            .map(|p| uuid(p).is_some_and(|u| found.contains(&u)))
            .collect())
    }

    fn upsert(&self, passages: Vec<Passage>) -> anyhow::Result<()> {
        let mut points = Vec::with_capacity(passages.len());
        let mut sizes = Vec::with_capacity(passages.len());
        for p in &passages {
            let (pt, bytes) = point(p, self.meta.passage_vectors(p)?);
            points.push(pt);
            sizes.push(bytes);
        }
        let runs = runs_within(&sizes, MAX_REQUEST_BYTES);
        let mut points = points.into_iter();
        for run in runs {
            let chunk: Vec<PointStruct> = points.by_ref().take(run.len()).collect();
            // `wait`: the points are applied when this returns, so `holds` after a crash
            // sees exactly what was written.
            self.run(self.client.upsert_points(
                UpsertPointsBuilder::new(&self.server.collection, chunk).wait(true),
            ))
            .map_err(|e| self.server.err(e))?;
        }
        Ok(())
    }

    fn flush(&self) -> anyhow::Result<()> {
        // Every upsert waited for the server to apply it; the server makes it durable.
        Ok(())
    }

    fn place(&self) -> String {
        self.server.place()
    }
}

fn nearest(mode: Mode, q: Parts<'_>) -> Query {
    Query::new_nearest(match mode {
        Mode::Dense => VectorInput::new_dense(q.dense.to_vec()),
        Mode::Sparse => {
            let (i, w): (Vec<u32>, Vec<f32>) = q.lexical.iter().copied().unzip();
            VectorInput::new_sparse(i, w)
        }
        Mode::Colbert => VectorInput::new_multi(q.colbert.to_vec()),
    })
}

/// SPEC §4 as one query: leaves for dense top-k and sparse top-k, each mode rescoring
/// their union, the formula of [`schema::formula_terms`] ranking it; the same tree the
/// in-process engine runs.
pub fn hybrid_query(
    collection: &str,
    q: Parts<'_>,
    top_k: usize,
    w: Weights,
    exact: bool,
) -> QueryPointsBuilder {
    let leaf = |mode: Mode| {
        let mut b = PrefetchQueryBuilder::default()
            .query(nearest(mode, q))
            .using(mode.name())
            .limit(top_k as u64);
        if exact && mode == Mode::Dense {
            b = b.params(SearchParamsBuilder::default().exact(true));
        }
        b.build()
    };
    let mut leaves = vec![leaf(Mode::Dense)];
    if !q.lexical.is_empty() {
        leaves.push(leaf(Mode::Sparse));
    }
    let union = schema::union_limit(top_k) as u64;
    let terms = schema::formula_terms(q, w);
    let formula = Expression::sum_with(terms.iter().enumerate().map(|(i, &(_, c))| {
        Expression::mult_with([Expression::constant(c), Expression::score_idx(i)])
    }));
    let prefetches: Vec<PrefetchQuery> = terms
        .iter()
        .map(|&(mode, _)| {
            PrefetchQueryBuilder::default()
                .prefetch(leaves.clone())
                .query(nearest(mode, q))
                .using(mode.name())
                .limit(union)
                .build()
        })
        .collect();
    QueryPointsBuilder::new(collection)
        .prefetch(prefetches)
        .query(Query::new_formula(FormulaBuilder::new(formula)))
        .limit(union)
        .with_payload(true)
        .with_vectors(true)
}

/// A returned point's vectors as an m3 embedding (an absent side empty).
fn unpack(v: Option<VectorsOutput>) -> Embedding {
    let mut named = match v.and_then(|v| v.vectors_options) {
        Some(VectorsOptions::Vectors(n)) => n.vectors,
        _ => HashMap::new(),
    };
    let mut take = |mode: Mode| named.remove(mode.name()).map(|v| v.into_vector());
    let dense = match take(Mode::Dense) {
        Some(OutVector::Dense(d)) => d.data,
        _ => Vec::new(),
    };
    let lexical = match take(Mode::Sparse) {
        Some(OutVector::Sparse(s)) => s.indices.into_iter().zip(s.values).collect(),
        _ => Vec::new(),
    };
    let colbert = match take(Mode::Colbert) {
        Some(OutVector::MultiDense(m)) => m.vectors.into_iter().map(|d| d.data).collect(),
        _ => Vec::new(),
    };
    schema::embedding(dense, lexical, colbert)
}

impl Retriever for QdrantServer {
    fn search(&self, q: &Embedding, top_k: usize, w: Weights) -> anyhow::Result<Vec<Found>> {
        let qv = self.meta.query_vectors(q)?;
        if top_k == 0 {
            return Ok(Vec::new());
        }
        let request = hybrid_query(&self.server.collection, qv, top_k, w, self.server.exact);
        let r = self
            .run(self.client.query(request))
            .map_err(|e| self.server.err(e))?;
        let place = self.server.place();
        let mut found = Vec::with_capacity(r.result.len());
        for p in r.result {
            let payload: Map<String, Value> = p
                .payload
                .into_iter()
                .map(|(k, v)| (k, v.into_json()))
                .collect();
            found.push(schema::candidate(
                qv,
                payload,
                &unpack(p.vectors),
                w,
                &place,
            )?);
        }
        ensure!(
            found.len() <= schema::union_limit(top_k),
            "{place}: the server returned more points than asked for"
        );
        Ok(schema::rank(found, top_k))
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
    use qdrant_client::qdrant::query::Variant;

    #[test]
    fn requests_are_split_under_the_limit_and_a_large_item_goes_alone() {
        assert_eq!(runs_within(&[], 10), Vec::<Range<usize>>::new());
        assert_eq!(runs_within(&[4, 4, 4, 4], 8), [0..2, 2..4]);
        assert_eq!(runs_within(&[4, 20, 4], 8), [0..1, 1..2, 2..3]);
        assert_eq!(runs_within(&[3, 3, 3], 9), vec![Range { start: 0, end: 3 }]);
    }

    #[test]
    fn the_query_tree_is_the_spec_s_union_ranked_by_the_formula() {
        let (d, l, c) = (vec![0.6, 0.8], vec![(4, 0.5)], vec![vec![1.0, 0.0]]);
        let q = Parts {
            dense: &d,
            lexical: &l,
            colbert: &c,
        };
        let r = hybrid_query("c", q, 5, Weights::default(), true).build();
        assert_eq!((r.collection_name.as_str(), r.limit), ("c", Some(10)));
        let using: Vec<_> = r
            .prefetch
            .iter()
            .map(|p| p.using.clone().unwrap())
            .collect();
        assert_eq!(using, ["dense", "sparse", "colbert"]);
        for p in &r.prefetch {
            assert_eq!(p.limit, Some(10));
            let leaves: Vec<_> = p
                .prefetch
                .iter()
                .map(|l| (l.using.clone().unwrap(), l.limit))
                .collect();
            assert_eq!(
                leaves,
                [("dense".into(), Some(5)), ("sparse".into(), Some(5))]
            );
            assert!(p.prefetch[0].params.as_ref().unwrap().exact == Some(true));
        }
        assert!(matches!(
            r.query.and_then(|q| q.variant),
            Some(Variant::Formula(_))
        ));
        // A query without lexical weights has one leaf and no sparse term.
        let q = Parts {
            dense: &d,
            lexical: &[],
            colbert: &c,
        };
        let r = hybrid_query("c", q, 3, Weights::default(), false).build();
        let using: Vec<_> = r
            .prefetch
            .iter()
            .map(|p| p.using.clone().unwrap())
            .collect();
        assert_eq!(using, ["dense", "colbert"]);
        assert_eq!(r.prefetch[0].prefetch.len(), 1);
        assert!(r.prefetch[0].prefetch[0].params.is_none());
    }

    #[test]
    fn a_returned_point_unpacks_to_the_vectors_written() {
        use qdrant_client::qdrant::{vectors_output, NamedVectorsOutput, VectorOutput};
        let out = |v: OutVector| VectorOutput {
            vector: Some(v),
            ..Default::default()
        };
        let named = HashMap::from([
            (
                "dense".to_string(),
                out(OutVector::Dense(qdrant_client::qdrant::DenseVector {
                    data: vec![0.6, 0.8],
                })),
            ),
            (
                "sparse".to_string(),
                out(OutVector::Sparse(qdrant_client::qdrant::SparseVector {
                    values: vec![0.5, 0.25],
                    indices: vec![3, 9],
                })),
            ),
            (
                "colbert".to_string(),
                out(OutVector::MultiDense(
                    qdrant_client::qdrant::MultiDenseVector {
                        vectors: vec![qdrant_client::qdrant::DenseVector {
                            data: vec![1.0, 0.0],
                        }],
                    },
                )),
            ),
        ]);
        let e = unpack(Some(VectorsOutput {
            vectors_options: Some(vectors_output::VectorsOptions::Vectors(
                NamedVectorsOutput { vectors: named },
            )),
        }));
        assert_eq!(e.dense.unwrap(), [0.6, 0.8]);
        assert_eq!(e.lexical.unwrap(), [(3, 0.5), (9, 0.25)]);
        assert_eq!(e.colbert.unwrap(), [vec![1.0, 0.0]]);
        let e = unpack(None);
        assert!(e.dense.unwrap().is_empty() && e.colbert.unwrap().is_empty());
    }
}
