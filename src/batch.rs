//! Packing tokenized texts into variable-length batches with no padding (DESIGN "Data
//! flow"): sequences concatenated, `cu_seqlens` offsets, texts sorted by length so a batch
//! holds similar lengths, batches filled up to a token budget.

use crate::text::Encoded;

/// One packed batch: sequences back to back.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBatch {
    /// Token ids of all sequences, concatenated.
    pub ids: Vec<u32>,
    /// Position ids (offset + index within the sequence).
    pub positions: Vec<u32>,
    /// `B + 1` offsets: sequence `i` is rows `cu_seqlens[i] .. cu_seqlens[i+1]`.
    pub cu_seqlens: Vec<u32>,
    /// For each sequence, its index in the caller's input order.
    pub origin: Vec<usize>,
}

impl PackedBatch {
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.origin.len()
    }

    /// Whether the batch holds no sequence.
    pub fn is_empty(&self) -> bool {
        self.origin.is_empty()
    }

    /// Total tokens.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Sequences `range` as a batch of their own (offsets rebased; origins 0..).
    pub fn slice(&self, range: std::ops::Range<usize>) -> PackedBatch {
        let (lo, hi) = (
            self.cu_seqlens[range.start] as usize,
            self.cu_seqlens[range.end] as usize,
        );
        PackedBatch {
            ids: self.ids[lo..hi].to_vec(),
            positions: self.positions[lo..hi].to_vec(),
            cu_seqlens: self.cu_seqlens[range.start..=range.end]
                .iter()
                .map(|&c| c - lo as u32)
                .collect(),
            origin: (0..range.len()).collect(),
        }
    }

    /// Row range of sequence `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[i] as usize..self.cu_seqlens[i + 1] as usize
    }
}

/// Packs `texts` into batches of at most `budget` tokens each (a longer single text gets a
/// batch of its own), longest first so the first batch shows the peak memory at once.
/// `position_offset` is the id of a sequence's first position (XLM-R: pad + 1; BERT: 0).
pub fn pack(texts: &[Encoded], budget: usize, position_offset: u32) -> Vec<PackedBatch> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(texts[i].ids.len()));
    let mut batches = Vec::new();
    let mut cur = empty();
    for i in order {
        let ids = &texts[i].ids;
        if !cur.is_empty() && cur.tokens() + ids.len() > budget {
            batches.push(std::mem::replace(&mut cur, empty()));
        }
        cur.ids.extend_from_slice(ids);
        cur.positions
            .extend((0..ids.len() as u32).map(|p| p + position_offset));
        cur.cu_seqlens.push(cur.ids.len() as u32);
        cur.origin.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Packs `texts` into one batch in the given order (training: each query's group of
/// passages must stay contiguous, positive first).
pub fn pack_in_order(texts: &[Encoded], position_offset: u32) -> PackedBatch {
    let ids: Vec<&[u32]> = texts.iter().map(|t| t.ids.as_slice()).collect();
    pack_ids_in_order(&ids, position_offset)
}

/// [`pack_in_order`] from token id sequences.
pub fn pack_ids_in_order(seqs: &[&[u32]], position_offset: u32) -> PackedBatch {
    let mut b = empty();
    for (i, ids) in seqs.iter().enumerate() {
        b.ids.extend_from_slice(ids);
        b.positions
            .extend((0..ids.len() as u32).map(|p| p + position_offset));
        b.cu_seqlens.push(b.ids.len() as u32);
        b.origin.push(i);
    }
    b
}

fn empty() -> PackedBatch {
    PackedBatch {
        ids: Vec::new(),
        positions: Vec::new(),
        cu_seqlens: vec![0],
        origin: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(n: usize) -> Encoded {
        Encoded {
            ids: (0..n as u32).collect(),
            cls_positions: vec![0],
            truncated: false,
        }
    }

    #[test]
    fn packs_within_budget_and_keeps_every_text_once() {
        let texts: Vec<Encoded> = [5, 9, 2, 7, 3, 30].iter().map(|&n| enc(n)).collect();
        let batches = pack(&texts, 12, 2);
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.origin.clone()).collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5]);
        for b in &batches {
            assert!(b.tokens() <= 12 || b.len() == 1, "{b:?}");
            assert_eq!(*b.cu_seqlens.last().unwrap() as usize, b.tokens());
            for i in 0..b.len() {
                let r = b.range(i);
                assert_eq!(r.len(), texts[b.origin[i]].ids.len());
                assert_eq!(b.positions[r.start], 2);
            }
        }
        // The 30-token text exceeds the budget and travels alone, first.
        assert_eq!(batches[0].origin, vec![5]);
    }
}
