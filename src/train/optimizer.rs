//! The optimiser's state on a backend: AdamW's moments and the step's gradients, each one
//! flat f32 arena ([`super::arena`]), and the f32 master weights (a flat arena too when
//! compute runs in bf16; with f32 compute the model's own tensors are the masters, so the
//! weights are held once); clipping, and the update that refreshes the compute copies.
//! The maths of one AdamW step and the schedules are [`super::optim`].

use anyhow::Context;

use super::arena::{GradArena, ParamLayout};
use super::model::{Master, TrainModel};
use super::optim::{clip_factor, step_scalars, AdamW, Moments};
use crate::backend::Backend;
use crate::tensor::{DType, HostData, Tensor};

/// Masters and moments of one training run.
pub struct Optimizer<B: Backend> {
    /// Where each trainable tensor lives in the arenas.
    layout: ParamLayout,
    /// f32 master weights `[layout.len()]` when compute runs in another dtype; `None`
    /// when the model's own f32 tensors are the masters.
    master: Option<Tensor<B>>,
    /// AdamW's first moments, same layout.
    m: Tensor<B>,
    /// AdamW's second moments, same layout.
    v: Tensor<B>,
    /// The gradients of the step being taken (kept across steps: a fresh arena would cost
    /// page faults on the CPU and an allocation on the device every step).
    grads: GradArena<B>,
    /// AdamW's hyper-parameters.
    pub hparams: AdamW,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
}

impl<B: Backend> Optimizer<B> {
    /// The optimiser for `model` (loaded in f32) computing in `dtype`: masters copied from
    /// the model, moments from `saved` (a checkpoint's, in the model's order) or zero, and
    /// with a compute dtype other than f32 the model then cast to it.
    pub fn new(
        be: &B,
        model: &mut TrainModel<B>,
        dtype: DType,
        hparams: AdamW,
        max_grad_norm: f64,
        saved: Option<&[Moments]>,
    ) -> anyhow::Result<Self> {
        let layout = ParamLayout::of(model);
        let master = if dtype == DType::F32 {
            None
        } else {
            let mut flat = be.zeros(&[layout.len()], DType::F32)?;
            for (s, (_, t)) in layout.slots().iter().zip(model.named_mut()) {
                be.add_at(&mut flat, s.offset, t)?;
            }
            Some(flat)
        };
        let (m, v) = match saved {
            Some(saved) => {
                let mut parts: [Vec<&[f32]>; 2] = [Vec::new(), Vec::new()];
                for (k, s) in layout.slots().iter().enumerate() {
                    let mo = saved
                        .get(k)
                        .filter(|mo| mo.m.len() == s.len() && mo.v.len() == s.len())
                        .with_context(|| {
                            format!("no saved moments of {:?} for {}", s.shape, s.name)
                        })?;
                    parts[0].push(&mo.m);
                    parts[1].push(&mo.v);
                }
                let up =
                    |p: &[&[f32]]| be.upload(HostData::F32(&layout.flatten(p)), &[layout.len()]);
                (up(&parts[0])?, up(&parts[1])?)
            }
            None => (
                be.zeros(&[layout.len()], DType::F32)?,
                be.zeros(&[layout.len()], DType::F32)?,
            ),
        };
        if dtype != DType::F32 {
            model.cast(be, dtype)?;
        }
        let grads = GradArena::zeros(be, &layout)?;
        Ok(Optimizer {
            layout,
            master,
            m,
            v,
            grads,
            hparams,
            max_grad_norm,
        })
    }

    /// Where each trainable tensor lives in the arenas.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The gradient arena for a new step, zeroed, with the layout it follows.
    pub fn zero_grads(
        &mut self,
        be: &B,
    ) -> crate::error::Result<(&ParamLayout, &mut GradArena<B>)> {
        self.grads.clear(be, &self.layout)?;
        Ok((&self.layout, &mut self.grads))
    }

    /// The gradients of the step being taken.
    pub fn grads(&self) -> &GradArena<B> {
        &self.grads
    }

    /// The factor gradients of global norm `norm` are scaled by.
    pub fn clip(&self, norm: f64) -> f32 {
        if self.max_grad_norm > 0.0 {
            clip_factor(norm, self.max_grad_norm)
        } else {
            1.0
        }
    }

    /// AdamW step `t` (1-based) at rate `lr` from the step's gradients scaled by `scale`
    /// (clipping, and the average over ranks), on every tensor that has a gradient (PyTorch
    /// skips parameters whose `grad` is `None`). With a master arena: one call per run of
    /// the arena, then the compute copies are refreshed from it on the device; with the
    /// model's f32 tensors as masters, one call per tensor, in place.
    pub fn update(
        &mut self,
        be: &B,
        model: &mut TrainModel<B>,
        t: u64,
        lr: f32,
        scale: f32,
    ) -> anyhow::Result<()> {
        let g = &self.grads;
        match &mut self.master {
            Some(master) => {
                for (range, decay) in self.layout.runs(&g.present) {
                    let s = step_scalars(t, lr, decay, scale, &self.hparams);
                    be.adamw(
                        master,
                        range.start,
                        g.flat(),
                        &mut self.m,
                        &mut self.v,
                        range.clone(),
                        &s,
                    )
                    .with_context(|| format!("AdamW on arena elements {range:?}"))?;
                }
                for (s, (_, t)) in self.layout.slots().iter().zip(model.named_mut()) {
                    be.read_at(master, s.offset, t)
                        .with_context(|| format!("refreshing {}", s.name))?;
                }
            }
            None => {
                let named = model.named_mut();
                for (k, (slot, (_, p))) in self.layout.slots().iter().zip(named).enumerate() {
                    if !g.present[k] {
                        continue;
                    }
                    let s = step_scalars(t, lr, slot.decays, scale, &self.hparams);
                    be.adamw(p, 0, g.flat(), &mut self.m, &mut self.v, slot.range(), &s)
                        .with_context(|| format!("AdamW on {}", slot.name))?;
                }
            }
        }
        Ok(())
    }

    /// The f32 master weights with their names, copied to the host.
    pub fn masters_host(&self, be: &B, model: &mut TrainModel<B>) -> anyhow::Result<Vec<Master>> {
        let held = model.held();
        let data = match &self.master {
            Some(flat) => self.layout.split(&be.to_vec_f32(flat)?),
            None => model
                .named_mut()
                .into_iter()
                .map(|(_, t)| be.to_vec_f32(t))
                .collect::<crate::error::Result<_>>()?,
        };
        Ok(self
            .layout
            .slots()
            .iter()
            .zip(data)
            .zip(held)
            .map(|((s, data), held)| Master {
                name: s.name.clone(),
                shape: s.shape.clone(),
                data,
                held,
            })
            .collect())
    }

    /// The moments `[m, v]` per tensor (model order), copied to the host.
    pub fn moments_host(&self, be: &B) -> anyhow::Result<Vec<[Vec<f32>; 2]>> {
        let m = self.layout.split(&be.to_vec_f32(&self.m)?);
        let v = self.layout.split(&be.to_vec_f32(&self.v)?);
        Ok(m.into_iter().zip(v).map(|(m, v)| [m, v]).collect())
    }
}
