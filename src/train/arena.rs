//! Flat arenas of the trainable parameters (llm.c's `ParameterTensors` idea): one f32
//! buffer each for the master weights, the gradients and AdamW's two moments, with every
//! tensor at a fixed offset. The global gradient norm is one reduction, AdamW one launch per
//! run of tensors that share a weight decay, and a data-parallel all-reduce one call.

use std::ops::Range;

use super::model::TrainModel;
use super::optim::decays;
use crate::backend::Backend;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// Offsets are multiples of this many elements (256 bytes), so every slot starts where a
/// vectorised kernel or a collective may assume alignment.
const ALIGN: usize = 64;

/// One trainable tensor's place in the arenas.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// HF name.
    pub name: String,
    /// Shape as m3 holds it (linear weights transposed).
    pub shape: Vec<usize>,
    /// First element in the arenas.
    pub offset: usize,
    /// Whether AdamW applies weight decay to it.
    pub decays: bool,
}

impl Slot {
    /// Element count.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot's elements in the arenas.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Where each trainable tensor lives, in [`TrainModel::named_mut`] order. In the arenas the
/// decayed tensors come first, then the others, so AdamW covers each group in one call.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamLayout {
    slots: Vec<Slot>,
    len: usize,
}

impl ParamLayout {
    /// The layout of tensors with these names and shapes (in the model's order).
    pub fn new(tensors: &[(String, Vec<usize>)]) -> Self {
        let mut slots: Vec<Slot> = tensors
            .iter()
            .map(|(name, shape)| Slot {
                name: name.clone(),
                shape: shape.clone(),
                offset: 0,
                decays: decays(name),
            })
            .collect();
        let mut at = 0;
        for group in [true, false] {
            for s in slots.iter_mut().filter(|s| s.decays == group) {
                s.offset = at;
                at = (at + s.len()).next_multiple_of(ALIGN);
            }
        }
        ParamLayout { slots, len: at }
    }

    /// The layout of `model`'s trainable tensors.
    pub fn of<B: Backend>(model: &mut TrainModel<B>) -> Self {
        let named: Vec<(String, Vec<usize>)> = model
            .named_mut()
            .into_iter()
            .map(|(n, t)| (n, t.shape().to_vec()))
            .collect();
        Self::new(&named)
    }

    /// The slots, in the model's order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Elements of each arena (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is nothing to train.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The arena ranges AdamW runs over: maximal runs of slots that have a gradient
    /// (`present`, in the model's order) and share a weight decay, with the decay flag.
    /// Padding between slots of a run is zero in every arena, so AdamW leaves it zero.
    pub fn runs(&self, present: &[bool]) -> Vec<(Range<usize>, bool)> {
        let mut order: Vec<usize> = (0..self.slots.len()).collect();
        order.sort_by_key(|&k| self.slots[k].offset);
        let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
        let mut open = false;
        for k in order {
            let s = &self.slots[k];
            if !present.get(k).copied().unwrap_or(false) || s.is_empty() {
                open = false;
                continue;
            }
            match runs.last_mut() {
                Some((r, d)) if open && *d == s.decays => r.end = s.range().end,
                _ => runs.push((s.range(), s.decays)),
            }
            open = true;
        }
        runs
    }

    /// Host values in arena layout from one vector per slot (model order).
    pub fn flatten(&self, parts: &[&[f32]]) -> Vec<f32> {
        let mut flat = vec![0f32; self.len];
        for (s, p) in self.slots.iter().zip(parts) {
            flat[s.range()].copy_from_slice(p);
        }
        flat
    }

    /// One vector per slot (model order) from host values in arena layout.
    pub fn split(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        self.slots
            .iter()
            .map(|s| flat[s.range()].to_vec())
            .collect()
    }
}

/// The gradient arena of one step: every parameter's gradient at its slot, and which
/// parameters received one (PyTorch's `grad is None` for the others: AdamW skips them).
pub struct GradArena<B: Backend> {
    /// Flat f32 gradients `[layout.len()]`.
    flat: Tensor<B>,
    /// Per slot (model order): whether any gradient reached it.
    pub present: Vec<bool>,
    /// Per slot: what was written since the arena was last cleared.
    written: Vec<Written>,
}

/// What of a slot holds values that [`GradArena::clear`] must zero.
#[derive(Debug, Clone, PartialEq)]
enum Written {
    Nothing,
    /// Only these rows (embedding lookups on a host backend): clearing zeroes them alone, so
    /// the 250k-row word-embedding slot is resident only where steps touched it.
    Rows(Vec<u32>),
    Whole,
}

impl<B: Backend> GradArena<B> {
    /// A zero arena for `layout`.
    pub fn zeros(be: &B, layout: &ParamLayout) -> Result<Self> {
        Ok(GradArena {
            flat: be.zeros(&[layout.len()], DType::F32)?,
            present: vec![false; layout.slots().len()],
            written: vec![Written::Nothing; layout.slots().len()],
        })
    }

    /// The flat gradients.
    pub fn flat(&self) -> &Tensor<B> {
        &self.flat
    }

    /// The flat gradients to change in place (an all-reduce); the whole arena then counts
    /// as written.
    pub fn flat_mut(&mut self) -> &mut Tensor<B> {
        self.written.fill(Written::Whole);
        &mut self.flat
    }

    /// Zeroes what was written since the last clear and marks every slot absent: one
    /// memset over the arena, or, where only some rows of a slot were written, the ranges
    /// around that slot and those rows.
    pub fn clear(&mut self, be: &B, layout: &ParamLayout) -> Result<()> {
        self.present.fill(false);
        if self.written.iter().all(|w| *w != Written::Nothing) && !self.any_rows() {
            be.zero(&mut self.flat)?;
        } else {
            let mut order: Vec<usize> = (0..self.written.len()).collect();
            order.sort_by_key(|&k| layout.slots()[k].offset);
            // Zero maximal ranges of wholly written slots (with the padding between them).
            let mut open: Option<Range<usize>> = None;
            for k in order {
                let s = &layout.slots()[k];
                match std::mem::replace(&mut self.written[k], Written::Nothing) {
                    Written::Whole => match &mut open {
                        Some(r) => r.end = s.range().end,
                        None => open = Some(s.range()),
                    },
                    w => {
                        if let Some(r) = open.take() {
                            be.zero_at(&mut self.flat, r.start, r.len())?;
                        }
                        if let Written::Rows(rows) = w {
                            let width = s.shape.get(1).copied().unwrap_or(1);
                            be.zero_rows_at(&mut self.flat, s.offset, width, &rows)?;
                        }
                    }
                }
            }
            if let Some(r) = open {
                be.zero_at(&mut self.flat, r.start, r.len())?;
            }
        }
        self.written.fill(Written::Nothing);
        Ok(())
    }

    fn any_rows(&self) -> bool {
        self.written.iter().any(|w| matches!(w, Written::Rows(_)))
    }

    /// Adds gradient `g` of slot `k` (model order) into the arena.
    pub fn add(&mut self, be: &B, layout: &ParamLayout, k: usize, g: &Tensor<B>) -> Result<()> {
        let s = &layout.slots()[k];
        if g.numel() != s.len() {
            return crate::error::shape_err(
                "gradient arena",
                format!(
                    "gradient of {} has shape {:?}, the slot {:?}",
                    s.name,
                    g.shape(),
                    s.shape
                ),
            );
        }
        be.add_at(&mut self.flat, s.offset, g)?;
        self.present[k] = true;
        self.written[k] = Written::Whole;
        Ok(())
    }

    /// Scatter-adds the row gradients `dy` of an embedding lookup `ids` into slot `k` (a
    /// `[vocab, D]` table): no vocabulary-sized tensor per step.
    pub fn add_rows(
        &mut self,
        be: &B,
        layout: &ParamLayout,
        k: usize,
        dy: &Tensor<B>,
        ids: &Tensor<B>,
    ) -> Result<()> {
        let s = &layout.slots()[k];
        let width = dy.rows_cols().1;
        if s.shape.len() != 2 || s.shape[1] != width {
            return crate::error::shape_err(
                "gradient arena",
                format!("rows {width} wide into {} of shape {:?}", s.name, s.shape),
            );
        }
        be.embedding_backward_at(dy, ids, &mut self.flat, s.offset, s.shape[0])?;
        self.present[k] = true;
        let host = match &self.written[k] {
            Written::Whole => None,
            _ => be.ids_on_host(ids),
        };
        self.written[k] = match (
            std::mem::replace(&mut self.written[k], Written::Whole),
            host,
        ) {
            (w @ (Written::Nothing | Written::Rows(_)), Some(rows)) => {
                let mut had = match w {
                    Written::Rows(had) => had,
                    _ => Vec::new(),
                };
                had.extend(rows);
                had.sort_unstable();
                had.dedup();
                Written::Rows(had)
            }
            _ => Written::Whole,
        };
        Ok(())
    }

    /// The global L2 norm: one reduction over the arena (padding is zero).
    pub fn norm(&self, be: &B) -> Result<f64> {
        Ok(be.sum_squares(&self.flat)?.sqrt())
    }

    /// Every slot's gradient copied out (model order; `None` where none reached it), with
    /// one download of the arena (tests and diagnostics).
    pub fn per_slot(&self, be: &B, layout: &ParamLayout) -> Result<Vec<Option<Vec<f32>>>> {
        let flat = be.to_vec_f32(&self.flat)?;
        Ok(layout
            .slots()
            .iter()
            .zip(&self.present)
            .map(|(s, &p)| p.then(|| flat[s.range()].to_vec()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> ParamLayout {
        ParamLayout::new(&[
            ("a.weight".into(), vec![3, 2]),
            ("a.bias".into(), vec![2]),
            ("b.weight".into(), vec![70]),
            ("b.LayerNorm.weight".into(), vec![5]),
        ])
    }

    #[test]
    fn decayed_slots_come_first_and_offsets_are_aligned() {
        let l = layout();
        let off: Vec<(usize, bool)> = l.slots().iter().map(|s| (s.offset, s.decays)).collect();
        assert_eq!(off, vec![(0, true), (192, false), (64, true), (256, false)]);
        assert_eq!(l.len(), 320);
        for s in l.slots() {
            assert_eq!(s.offset % ALIGN, 0);
        }
    }

    #[test]
    fn runs_merge_present_neighbours_of_one_decay_and_skip_absent_slots() {
        let l = layout();
        assert_eq!(
            l.runs(&[true, true, true, true]),
            vec![(0..134, true), (192..261, false)]
        );
        assert_eq!(
            l.runs(&[false, true, true, false]),
            vec![(64..134, true), (192..194, false)]
        );
        assert_eq!(
            l.runs(&[true, false, false, true]),
            vec![(0..6, true), (256..261, false)]
        );
    }

    #[test]
    fn flatten_and_split_are_inverse() {
        let l = layout();
        let parts: Vec<Vec<f32>> = l
            .slots()
            .iter()
            .enumerate()
            .map(|(k, s)| (0..s.len()).map(|i| (k * 100 + i) as f32).collect())
            .collect();
        let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        let flat = l.flatten(&refs);
        assert_eq!(l.split(&flat), parts);
        assert_eq!(flat[6..64].iter().filter(|&&x| x != 0.0).count(), 0);
    }
}

#[cfg(test)]
mod clear_tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::tensor::HostData;

    // A 5-row embedding table between two dense slots.
    fn layout() -> ParamLayout {
        ParamLayout::new(&[
            ("a.weight".into(), vec![4]),
            ("emb.weight".into(), vec![5, 3]),
            ("b.weight".into(), vec![2]),
        ])
    }

    fn rows(be: &Cpu) -> (Tensor<Cpu>, Tensor<Cpu>) {
        let dy: Vec<f32> = (1..=9).map(|x| x as f32).collect();
        let dy = be.upload(HostData::F32(&dy), &[3, 3]).unwrap();
        let ids = be.upload(HostData::U32(&[4, 1, 4]), &[3]).unwrap();
        (dy, ids)
    }

    #[test]
    fn rows_land_where_the_dense_scatter_puts_them() {
        let (be, l) = (Cpu, layout());
        let mut g = GradArena::zeros(&be, &l).unwrap();
        let (dy, ids) = rows(&be);
        g.add_rows(&be, &l, 1, &dy, &ids).unwrap();
        g.add_rows(&be, &l, 1, &dy, &ids).unwrap();
        let dense = be.embedding_backward(&dy, &ids, 5).unwrap();
        let want: Vec<f32> = be
            .to_vec_f32(&dense)
            .unwrap()
            .iter()
            .map(|x| 2.0 * x)
            .collect();
        let got = g.per_slot(&be, &l).unwrap();
        assert_eq!(got[1].as_deref(), Some(want.as_slice()));
        assert_eq!(got[0], None);
        assert!(
            g.add_rows(&be, &l, 0, &dy, &ids).is_err(),
            "a 1-D slot takes no rows"
        );
    }

    #[test]
    fn clear_zeroes_everything_written_and_only_touched_rows_are_recorded() {
        let (be, l) = (Cpu, layout());
        let mut g = GradArena::zeros(&be, &l).unwrap();
        let (dy, ids) = rows(&be);
        let ones = |n| be.upload(HostData::F32(&vec![1.0; n]), &[n]).unwrap();
        g.add(&be, &l, 0, &ones(4)).unwrap();
        g.add_rows(&be, &l, 1, &dy, &ids).unwrap();
        g.add(&be, &l, 2, &ones(2)).unwrap();
        assert_eq!(g.written[1], Written::Rows(vec![1, 4]));
        g.clear(&be, &l).unwrap();
        assert!(be.to_vec_f32(g.flat()).unwrap().iter().all(|&x| x == 0.0));
        assert_eq!(g.present, vec![false; 3]);
        // Values the arena did not write (rows 0, 2, 3) survive a clear: only what was
        // recorded is zeroed, which is what keeps untouched pages out of memory.
        let slot = l.slots()[1].offset;
        let mut all = vec![0f32; l.len()];
        all[slot..slot + 15].fill(7.0);
        be.write_f32(&mut g.flat, &all).unwrap();
        g.add_rows(&be, &l, 1, &dy, &ids).unwrap();
        g.clear(&be, &l).unwrap();
        let left = be.to_vec_f32(g.flat()).unwrap();
        let kept: Vec<usize> = (0..5).filter(|r| left[slot + r * 3] == 7.0).collect();
        assert_eq!(kept, vec![0, 2, 3]);
        // After an in-place change of the whole arena (the all-reduce) everything is zeroed.
        be.write_f32(g.flat_mut(), &vec![3.0; l.len()]).unwrap();
        g.clear(&be, &l).unwrap();
        assert!(be.to_vec_f32(g.flat()).unwrap().iter().all(|&x| x == 0.0));
    }
}
