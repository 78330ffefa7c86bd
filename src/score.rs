//! Scores between queries and passages (SPEC §4): dense, lexical, colbert (max-sim) and the
//! weighted hybrid, for single pairs and for query × corpus matrices.

use std::collections::HashMap;

/// The three modes' weights for a hybrid score: `(dense, sparse, colbert)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Dense weight w1.
    pub dense: f32,
    /// Lexical weight w2.
    pub sparse: f32,
    /// Colbert weight w3.
    pub colbert: f32,
}

impl Default for Weights {
    /// BGE-M3's README weights `[0.4, 0.2, 0.4]`.
    fn default() -> Self {
        Weights {
            dense: 0.4,
            sparse: 0.2,
            colbert: 0.4,
        }
    }
}

/// The five scores `compute_score` reports for a pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScores {
    /// `<e_q, e_p>`.
    pub dense: f32,
    /// `Σ w_q(t)·w_p(t)` over shared token ids.
    pub sparse: f32,
    /// Mean over query vectors of the best passage-vector similarity.
    pub colbert: f32,
    /// `(w1·dense + w2·sparse) / (w1 + w2)`.
    pub sparse_dense: f32,
    /// `(w1·dense + w2·sparse + w3·colbert) / (w1 + w2 + w3)`.
    pub all: f32,
}

/// Inner product.
pub fn dense(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Calls `f(x, y)` for each pair of items of two lists sorted by id (`ka`, `kb`) that share
/// an id, in id order: the one lexical merge, on the host for pairs and in training.
pub fn merge_shared<T, U>(
    a: &[T],
    b: &[U],
    ka: impl Fn(&T) -> u32,
    kb: impl Fn(&U) -> u32,
    mut f: impl FnMut(&T, &U),
) {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match ka(&a[i]).cmp(&kb(&b[j])) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                f(&a[i], &b[j]);
                i += 1;
                j += 1;
            }
        }
    }
}

/// Lexical matching score of two `(id, weight)` lists sorted by id.
pub fn lexical(a: &[(u32, f32)], b: &[(u32, f32)]) -> f32 {
    let mut s = 0f32;
    merge_shared(a, b, |x| x.0, |y| y.0, |x, y| s += x.1 * y.1);
    s
}

/// The best match of query vector `q` among `rows`: `(similarity, index)`, the first of
/// equals, `(-inf, None)` when there is no row (or every similarity is NaN). The one
/// max-sim inner step, for pairs and in training.
pub fn best_match<'a>(q: &[f32], rows: impl Iterator<Item = &'a [f32]>) -> (f32, Option<usize>) {
    let (mut m, mut arg) = (f32::NEG_INFINITY, None);
    for (j, r) in rows.enumerate() {
        let s = dense(q, r);
        if s > m {
            m = s;
            arg = Some(j);
        }
    }
    (m, arg)
}

/// `(1/N) Σ_i max_j <q_i, p_j>` over the passage's real rows (SPEC §4); 0 for an empty
/// query or passage.
pub fn colbert(q: &[Vec<f32>], p: &[Vec<f32>]) -> f32 {
    if q.is_empty() || p.is_empty() {
        return 0.0;
    }
    let total: f32 = q
        .iter()
        .map(|qi| best_match(qi, p.iter().map(Vec::as_slice)).0)
        .sum();
    total / q.len() as f32
}

/// One packed lexical side grouped by token id: each sequence's kept rows form "entries",
/// one per distinct id, sorted by id, rows ascending. The grouping behind every lexical
/// rule: inference weights, CPU training scores and the device kernels' inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexicalEntries {
    /// Token id of each entry `[U]`.
    pub ids: Vec<u32>,
    /// Sequence of each entry `[U]`.
    pub seq: Vec<u32>,
    /// Rows of all entries, grouped by entry `[R]`.
    pub rows: Vec<u32>,
    /// Entry `k`'s rows are `rows[start[k]..start[k+1]]` (`[U + 1]`).
    pub start: Vec<u32>,
    /// Sequence `b`'s entries are `seg[b]..seg[b+1]` (`[B + 1]`).
    pub seg: Vec<u32>,
}

impl LexicalEntries {
    /// Groups one side (`ids [T]`, offsets `cu [B + 1]`), rows whose id `skip`s dropped.
    pub fn build(ids: &[u32], cu: &[u32], skip: impl Fn(u32) -> bool) -> Self {
        let mut e = LexicalEntries {
            ids: Vec::new(),
            seq: Vec::new(),
            rows: Vec::new(),
            start: vec![0],
            seg: vec![0],
        };
        for (b, w) in cu.windows(2).enumerate() {
            let mut rows: Vec<u32> = (w[0]..w[1]).filter(|&r| !skip(ids[r as usize])).collect();
            rows.sort_by_key(|&r| (ids[r as usize], r));
            for (i, &r) in rows.iter().enumerate() {
                if i == 0 || ids[rows[i - 1] as usize] != ids[r as usize] {
                    if i > 0 {
                        e.start.push(e.rows.len() as u32);
                    }
                    e.ids.push(ids[r as usize]);
                    e.seq.push(b as u32);
                }
                e.rows.push(r);
            }
            if !rows.is_empty() {
                e.start.push(e.rows.len() as u32);
            }
            e.seg.push(e.ids.len() as u32);
        }
        e
    }

    /// Entry `k`'s rows, ascending.
    pub fn rows_of(&self, k: usize) -> &[u32] {
        &self.rows[self.start[k] as usize..self.start[k + 1] as usize]
    }

    /// Sequence `b`'s entries.
    pub fn entries_of(&self, b: usize) -> std::ops::Range<usize> {
        self.seg[b] as usize..self.seg[b + 1] as usize
    }
}

/// The hybrid combinations of three mode scores.
pub fn combine(dense: f32, sparse: f32, colbert: f32, w: Weights) -> PairScores {
    PairScores {
        dense,
        sparse,
        colbert,
        sparse_dense: (w.dense * dense + w.sparse * sparse) / (w.dense + w.sparse),
        all: (w.dense * dense + w.sparse * sparse + w.colbert * colbert)
            / (w.dense + w.sparse + w.colbert),
    }
}

/// Dense scores of every query against every passage, `[queries][passages]`.
pub fn dense_matrix(queries: &[Vec<f32>], passages: &[Vec<f32>]) -> Vec<Vec<f32>> {
    queries
        .iter()
        .map(|q| passages.iter().map(|p| dense(q, p)).collect())
        .collect()
}

/// Colbert scores of every query against every passage, `[queries][passages]`.
pub fn colbert_matrix(queries: &[Vec<Vec<f32>>], passages: &[Vec<Vec<f32>>]) -> Vec<Vec<f32>> {
    queries
        .iter()
        .map(|q| passages.iter().map(|p| colbert(q, p)).collect())
        .collect()
}

/// An inverted index over lexical weights: token id → (passage, weight).
#[derive(Debug, Default, Clone)]
pub struct InvertedIndex {
    postings: HashMap<u32, Vec<(u32, f32)>>,
    passages: usize,
}

impl InvertedIndex {
    /// Builds the index from each passage's `(id, weight)` list.
    pub fn build(lexical: &[Vec<(u32, f32)>]) -> Self {
        let mut postings: HashMap<u32, Vec<(u32, f32)>> = HashMap::new();
        for (p, weights) in lexical.iter().enumerate() {
            for &(id, w) in weights {
                postings.entry(id).or_default().push((p as u32, w));
            }
        }
        InvertedIndex {
            postings,
            passages: lexical.len(),
        }
    }

    /// Lexical scores of one query against every passage.
    pub fn scores(&self, query: &[(u32, f32)]) -> Vec<f32> {
        let mut s = vec![0f32; self.passages];
        for &(id, w) in query {
            if let Some(list) = self.postings.get(&id) {
                for &(p, pw) in list {
                    s[p as usize] += w * pw;
                }
            }
        }
        s
    }

    /// The postings, for serialisation.
    pub fn postings(&self) -> &HashMap<u32, Vec<(u32, f32)>> {
        &self.postings
    }

    /// Rebuilds an index from postings over `passages` passages.
    pub fn from_postings(postings: HashMap<u32, Vec<(u32, f32)>>, passages: usize) -> Self {
        InvertedIndex { postings, passages }
    }
}

/// Lexical scores of every query against every passage through an inverted index.
pub fn lexical_matrix(queries: &[Vec<(u32, f32)>], index: &InvertedIndex) -> Vec<Vec<f32>> {
    queries.iter().map(|q| index.scores(q)).collect()
}

/// Indices of the `k` largest scores, best first (ties by lower index).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_by_hand() {
        assert_eq!(lexical(&[(1, 0.5), (4, 2.0)], &[(2, 9.0), (4, 0.25)]), 0.5);
        let q = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let p = vec![vec![0.6, 0.8], vec![-1.0, 0.0]];
        // max sims: 0.6 and 0.8 -> mean 0.7
        assert!((colbert(&q, &p) - 0.7).abs() < 1e-6);
        // A query row whose every similarity is negative keeps its (negative) max.
        assert!((colbert(&[vec![-1.0, 0.0]], &[vec![1.0, 0.0]]) + 1.0).abs() < 1e-6);
        let c = combine(1.0, 0.5, 0.25, Weights::default());
        assert!((c.sparse_dense - (0.4 + 0.1) / 0.6).abs() < 1e-6);
        assert!((c.all - (0.4 + 0.1 + 0.1)).abs() < 1e-6);
        let idx = InvertedIndex::build(&[vec![(1, 1.0)], vec![(1, 2.0), (3, 1.0)]]);
        assert_eq!(idx.scores(&[(1, 0.5), (3, 2.0)]), vec![0.5, 3.0]);
        assert_eq!(top_k(&[0.1, 0.9, 0.5], 2), vec![1, 2]);
        // Matrix forms agree with the pair forms.
        let qs = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let ps = vec![vec![0.6, 0.8], vec![1.0, 0.0], vec![0.0, -1.0]];
        let dm = dense_matrix(&qs, &ps);
        assert_eq!(dm[1][0], dense(&qs[1], &ps[0]));
        let cm = colbert_matrix(std::slice::from_ref(&q), &[p.clone(), vec![vec![0.0, 1.0]]]);
        assert_eq!(cm[0], vec![colbert(&q, &p), 0.5]);
        let lex = vec![vec![(1, 2.0)], vec![(3, 1.0)]];
        assert_eq!(
            lexical_matrix(&[vec![(1, 1.0), (3, 1.0)]], &InvertedIndex::build(&lex)),
            vec![vec![2.0, 1.0]]
        );
    }

    #[test]
    fn lexical_entries_group_rows_by_id_per_sequence() {
        // Two sequences: [5, 9, 5, 0] and [0, 7]; id 0 is excluded; the third is empty.
        let ids = [5, 9, 5, 0, 0, 7];
        let e = LexicalEntries::build(&ids, &[0, 4, 6, 6], |id| id == 0);
        assert_eq!(e.ids, vec![5, 9, 7]);
        assert_eq!(e.seq, vec![0, 0, 1]);
        assert_eq!(e.rows, vec![0, 2, 1, 5]);
        assert_eq!(e.start, vec![0, 2, 3, 4]);
        assert_eq!(e.seg, vec![0, 2, 3, 3]);
        assert_eq!(e.rows_of(0), &[0, 2]);
        assert_eq!(e.entries_of(1), 2..3);
        assert_eq!(e.entries_of(2), 3..3);
    }

    #[test]
    fn best_match_takes_the_first_of_equals_and_nothing_from_no_rows() {
        let rows = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]];
        let q = [2.0, 0.5];
        assert_eq!(best_match(&q, rows.iter().map(|r| &r[..])), (2.0, Some(0)));
        assert_eq!(
            best_match(&q, std::iter::empty()),
            (f32::NEG_INFINITY, None)
        );
        let mut seen = Vec::new();
        merge_shared(
            &[(1, 'a'), (3, 'b'), (8, 'c')],
            &[3, 4, 8],
            |x| x.0,
            |&y| y,
            |x, y| seen.push((x.1, *y)),
        );
        assert_eq!(seen, vec![('b', 3), ('c', 8)]);
    }
}
