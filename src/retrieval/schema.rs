//! What m3's two Qdrant engines (in process, [`super::qdrant`]; server or cluster,
//! [`super::qdrant_server`]) share, so that a corpus indexed in either answers a query the
//! same way: m3's record beside the points ([`Meta`]: format, model fingerprint, kept
//! fields), point ids from passage ids, the checks on passage and query vectors, the
//! weights of the SPEC §4 formula the engine ranks by, and the final ranking of the
//! engine's candidates by m3's own arithmetic ([`crate::score`]).
//!
//! The schema itself: named vectors `dense` (dot product of unit vectors, i.e. cosine),
//! `sparse` (token id → weight, dot product) and `colbert` (multivector, MAX_SIM); payload
//! `id` (the passage id), `pos` (its corpus position, which ranks ties) and the kept fields.
//! Dot product rather than Qdrant's cosine: m3's vectors are unit length already, so the
//! scores are the cosine's and the stored vectors stay bit-identical to the model's output
//! (cosine would renormalise them).

use anyhow::{bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Found, Passage};
use crate::index::ModelFingerprint;
use crate::model::embedder::Embedding;
use crate::score::{self, Weights};

/// The format this code writes and reads.
pub const FORMAT: &str = "m3-qdrant/1";
/// Payload keys m3 itself writes (a kept corpus field may not use them).
pub const RESERVED: [&str; 2] = ["id", "pos"];

// Passage ids become UUIDs under this namespace (v5: SHA-1 of the id's JSON), so the same
// id is the same point in every run and on every engine.
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d33_2d71_6472_616e_742d_7061_7373_6167);

/// m3's record of an index: `m3-qdrant.json` in process, the collection's metadata on a
/// server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT`].
    pub format: String,
    /// The model the passages were embedded with.
    pub model: ModelFingerprint,
    /// Corpus fields kept in each point's payload.
    pub keep: Vec<String>,
}

impl Meta {
    /// The record of a new index, refusing a kept field named like one m3 writes.
    pub fn new(model: &ModelFingerprint, keep: &[String]) -> anyhow::Result<Self> {
        for k in keep {
            ensure!(
                !RESERVED.contains(&k.as_str()),
                "--keep {k}: m3 writes that payload key itself"
            );
        }
        Ok(Meta {
            format: FORMAT.into(),
            model: model.clone(),
            keep: keep.to_vec(),
        })
    }

    /// Reads a record, refusing another format; `what` names where it came from.
    pub fn from_json(v: Value, what: &str) -> anyhow::Result<Self> {
        let format = v.get("format").and_then(Value::as_str).unwrap_or("");
        ensure!(
            format == FORMAT,
            "{what}: index format {format:?}, this m3 reads {FORMAT:?}: rebuild it with m3 \
             search index"
        );
        serde_json::from_value(v).map_err(|e| anyhow::anyhow!("{what}: malformed: {e}"))
    }

    /// Refuses to go on indexing with another model or other kept fields than the index's.
    pub fn check_resume(
        &self,
        model: &ModelFingerprint,
        keep: &[String],
        what: &str,
    ) -> anyhow::Result<()> {
        let d = self.model.differences(model);
        ensure!(
            d.is_empty(),
            "{what}: the index was built with another model: {}; index into a new one or use \
             that model",
            d.join(", ")
        );
        ensure!(
            self.keep == keep,
            "{what}: the index keeps the fields {:?}, not {keep:?}; index with the same --keep \
             or into a new one",
            self.keep
        );
        Ok(())
    }

    /// The passage's three outputs, refusing one missing or of other sizes than the index's.
    pub fn passage_vectors<'a>(&self, p: &'a Passage) -> anyhow::Result<Parts<'a>> {
        let (dd, cd) = (self.model.dense_dim, self.model.colbert_dim);
        let e = &p.embedding;
        let (Some(dense), Some(lexical), Some(colbert)) = (&e.dense, &e.lexical, &e.colbert) else {
            bail!("passage {}: needs dense, lexical and colbert outputs", p.id);
        };
        ensure!(
            dense.len() == dd && colbert.iter().all(|r| r.len() == cd),
            "passage {}: vectors are not the index's sizes (dense {dd}, colbert {cd})",
            p.id
        );
        Ok(Parts {
            dense,
            lexical,
            colbert,
        })
    }

    /// The query's three outputs, refusing one missing or of other sizes than the index's.
    pub fn query_vectors<'a>(&self, q: &'a Embedding) -> anyhow::Result<Parts<'a>> {
        let (dd, cd) = (self.model.dense_dim, self.model.colbert_dim);
        let (Some(dense), Some(lexical), Some(colbert)) = (&q.dense, &q.lexical, &q.colbert) else {
            bail!("a query needs dense, lexical and colbert outputs");
        };
        ensure!(
            dense.len() == dd && colbert.iter().all(|r| r.len() == cd),
            "query vectors do not have the index's sizes (dense {dd}, colbert {cd})"
        );
        Ok(Parts {
            dense,
            lexical,
            colbert,
        })
    }
}

/// One embedding's three outputs.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    /// The dense vector.
    pub dense: &'a [f32],
    /// Token id → weight.
    pub lexical: &'a [(u32, f32)],
    /// The colbert rows.
    pub colbert: &'a [Vec<f32>],
}

/// The point id (a UUID) of passage id `id`.
pub fn point_uuid(id: &Value) -> uuid::Uuid {
    let key = serde_json::to_string(id).expect("a JSON value serialises");
    uuid::Uuid::new_v5(&NAMESPACE, key.as_bytes())
}

/// A named vector of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `dense`.
    Dense,
    /// `sparse`.
    Sparse,
    /// `colbert`.
    Colbert,
}

impl Mode {
    /// The vector's name in the collection.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Dense => "dense",
            Mode::Sparse => "sparse",
            Mode::Colbert => "colbert",
        }
    }
}

/// The terms of the engine's ranking formula for query `q`: `Σ weight · $score[i]` over
/// the modes the query has (an empty sparse or colbert side is left out, and the engine
/// scores it 0 as m3 does). Weights are normalised as [`score::combine`] does; colbert's
/// MAX_SIM is a sum over query rows where m3's score is their mean, hence the 1/rows.
pub fn formula_terms(q: Parts<'_>, w: Weights) -> Vec<(Mode, f32)> {
    let total = w.dense + w.sparse + w.colbert;
    let mut terms = vec![(Mode::Dense, w.dense / total)];
    if !q.lexical.is_empty() {
        terms.push((Mode::Sparse, w.sparse / total));
    }
    if !q.colbert.is_empty() {
        terms.push((Mode::Colbert, w.colbert / total / q.colbert.len() as f32));
    }
    terms
}

/// Candidates per mode: the union of dense top-k and sparse top-k holds at most 2k points.
pub fn union_limit(top_k: usize) -> usize {
    2 * top_k
}

/// An engine's candidate scored by m3: its corpus position (ranks ties) and what the query
/// returns.
pub fn candidate(
    q: Parts<'_>,
    mut payload: Map<String, Value>,
    passage: &Embedding,
    w: Weights,
    what: &str,
) -> anyhow::Result<(u64, Found)> {
    let (Some(id), Some(pos)) = (
        payload.remove("id"),
        payload.remove("pos").and_then(|v| v.as_u64()),
    ) else {
        bail!("{what}: a point without its m3 id and position");
    };
    let scores = score::combine(
        score::dense(q.dense, passage.dense.as_deref().unwrap_or(&[])),
        score::lexical(q.lexical, passage.lexical.as_deref().unwrap_or(&[])),
        score::colbert(q.colbert, passage.colbert.as_deref().unwrap_or(&[])),
        w,
    );
    Ok((
        pos,
        Found {
            id,
            scores,
            fields: payload,
        },
    ))
}

/// The `top_k` best candidates by m3's hybrid score, ties by corpus position: the order
/// m3's own index gives (the engine's formula ranks the same way up to rounding).
pub fn rank(mut found: Vec<(u64, Found)>, top_k: usize) -> Vec<Found> {
    found.sort_by(|(pa, a), (pb, b)| b.scores.all.total_cmp(&a.scores.all).then(pa.cmp(pb)));
    found.truncate(top_k);
    found.into_iter().map(|(_, f)| f).collect()
}

/// A returned point's vectors as an m3 embedding: every side present, an absent one empty.
pub fn embedding(dense: Vec<f32>, lexical: Vec<(u32, f32)>, colbert: Vec<Vec<f32>>) -> Embedding {
    Embedding {
        dense: Some(dense),
        lexical: Some(lexical),
        colbert: Some(colbert),
    }
}

/// The payload m3 writes for a passage: its kept fields, `id` and `pos`.
pub fn payload(p: &Passage) -> Map<String, Value> {
    let mut payload = p.fields.clone();
    payload.insert("id".into(), p.id.clone());
    payload.insert("pos".into(), Value::from(p.pos));
    payload
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn model(dense_dim: usize) -> ModelFingerprint {
        ModelFingerprint {
            dense_dim,
            colbert_dim: 2,
            vocab_size: 10,
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn a_record_round_trips_and_refuses_another_model_format_or_kept_fields() {
        let keep = vec!["lang".to_string()];
        let m = Meta::new(&model(3), &keep).unwrap();
        let back = Meta::from_json(serde_json::to_value(&m).unwrap(), "x").unwrap();
        assert_eq!(back, m);
        back.check_resume(&model(3), &keep, "x").unwrap();
        let e = back.check_resume(&model(4), &keep, "x").unwrap_err();
        assert!(format!("{e}").contains("dense size 3 vs 4"), "{e}");
        assert!(back.check_resume(&model(3), &[], "x").is_err());
        let mut v = serde_json::to_value(&m).unwrap();
        v["format"] = Value::from("m3-qdrant/0");
        assert!(format!("{}", Meta::from_json(v, "x").unwrap_err()).contains("m3-qdrant/0"));
        assert!(Meta::new(&model(3), &["pos".into()]).is_err());
    }

    #[test]
    fn formula_terms_are_the_normalised_weights_with_colbert_per_row() {
        let (d, l, c) = (
            vec![1.0, 0.0, 0.0],
            vec![(1, 0.5)],
            vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        );
        let w = Weights {
            dense: 2.0,
            sparse: 1.0,
            colbert: 1.0,
        };
        let q = Parts {
            dense: &d,
            lexical: &l,
            colbert: &c,
        };
        assert_eq!(
            formula_terms(q, w),
            [
                (Mode::Dense, 0.5),
                (Mode::Sparse, 0.25),
                (Mode::Colbert, 0.125)
            ]
        );
        let q = Parts {
            dense: &d,
            lexical: &[],
            colbert: &[],
        };
        assert_eq!(formula_terms(q, w), [(Mode::Dense, 0.5)]);
    }

    #[test]
    fn the_same_id_is_the_same_point_and_ids_of_other_types_differ() {
        assert_eq!(point_uuid(&Value::from("a")), point_uuid(&Value::from("a")));
        assert_ne!(point_uuid(&Value::from("1")), point_uuid(&Value::from(1)));
    }
}
