//! Hybrid retrieval, whichever engine holds the index: m3's own verified files
//! ([`crate::index`]), Qdrant's in-process engine in a directory ([`qdrant`], cargo feature
//! `qdrant`), or a Qdrant server or cluster ([`qdrant_server`], feature `qdrant-server`;
//! both on by default). All answer SPEC §4's query the same way: candidates from dense
//! top-k ∪ lexical top-k (the passages sharing a token with the query), ranked by the
//! weighted dense + lexical + colbert score of [`crate::score`]. The CLI, the server and
//! the bindings go through [`open`] and [`Retriever`]; indexing into Qdrant through
//! [`Collection`].

#[cfg(feature = "qdrant")]
pub mod qdrant;
#[cfg(feature = "qdrant-server")]
pub mod qdrant_server;
#[cfg(any(feature = "qdrant", feature = "qdrant-server"))]
pub mod schema;

use std::path::Path;

use anyhow::ensure;
use serde_json::{Map, Value};

use crate::index::{Index, ModelFingerprint};
use crate::model::embedder::Embedding;
use crate::score::{PairScores, Weights};

/// One retrieved passage.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The passage id (the corpus line's "id", else its 0-based position).
    pub id: Value,
    /// Its scores; `all` is the hybrid that ranks.
    pub scores: PairScores,
    /// The corpus fields the index keeps (empty for m3's own index).
    pub fields: Map<String, Value>,
}

/// A found passage as `m3 search query` and `POST /search` write it: `{"id", "score",
/// "dense", "sparse", "colbert"}` and the kept fields under `"fields"`, if any.
impl serde::Serialize for Found {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            id: &'a Value,
            score: f32,
            dense: f32,
            sparse: f32,
            colbert: f32,
            #[serde(skip_serializing_if = "Map::is_empty")]
            fields: &'a Map<String, Value>,
        }
        Line {
            id: &self.id,
            score: self.scores.all,
            dense: self.scores.dense,
            sparse: self.scores.sparse,
            colbert: self.scores.colbert,
            fields: &self.fields,
        }
        .serialize(s)
    }
}

/// One passage to index.
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

/// An index that takes passages as they are encoded, keyed by passage id: upserting a
/// held id replaces it, so a rerun after a crash never duplicates.
pub trait Collection: Retriever {
    /// Which of `ids` the index already holds.
    fn holds(&self, ids: &[Value]) -> anyhow::Result<Vec<bool>>;
    /// Writes `passages` (a passage already held is replaced whole).
    fn upsert(&self, passages: Vec<Passage>) -> anyhow::Result<()>;
    /// Makes everything upserted so far durable.
    fn flush(&self) -> anyhow::Result<()>;
    /// Where the index is, for messages (a directory, or a collection at a URL).
    fn place(&self) -> String;
}

/// An index that answers hybrid queries.
pub trait Retriever: Send + Sync {
    /// The `top_k` passages for a query by the weighted hybrid, best first (ties by corpus
    /// position).
    fn search(&self, q: &Embedding, top_k: usize, w: Weights) -> anyhow::Result<Vec<Found>>;
    /// The fingerprint of the model the index was built with.
    fn model(&self) -> &ModelFingerprint;
    /// Passages held.
    fn passages(&self) -> anyhow::Result<usize>;

    /// Refuses a query model other than the index's, naming what differs.
    fn check_model(&self, dir: &Path, model: &ModelFingerprint) -> anyhow::Result<()> {
        let d = self.model().differences(model);
        ensure!(
            d.is_empty(),
            "the index was built with another model than {}: {}; query with that model or \
             rebuild the index",
            dir.display(),
            d.join(", ")
        );
        Ok(())
    }
}

impl Retriever for Index {
    fn search(&self, q: &Embedding, top_k: usize, w: Weights) -> anyhow::Result<Vec<Found>> {
        Ok(Index::search(self, q, top_k, w)?
            .into_iter()
            .map(|h| Found {
                id: self.id(h.passage).clone(),
                scores: h.scores,
                fields: Map::new(),
            })
            .collect())
    }

    fn model(&self) -> &ModelFingerprint {
        Index::model(self)
    }

    fn passages(&self) -> anyhow::Result<usize> {
        Ok(Index::len(self))
    }
}

/// The index in `dir`, whichever engine holds it.
pub fn open(dir: &Path) -> anyhow::Result<Box<dyn Retriever>> {
    #[cfg(feature = "qdrant")]
    if qdrant::QdrantIndex::is_one(dir) {
        return Ok(Box::new(qdrant::QdrantIndex::open(dir)?));
    }
    #[cfg(not(feature = "qdrant"))]
    ensure!(
        !dir.join("m3-qdrant.json").exists(),
        "{}: a Qdrant index, and this m3 was built without the qdrant feature",
        dir.display()
    );
    Ok(Box::new(Index::load(dir)?))
}
