//! The optimiser's state on a backend: the f32 master weights (the model's own tensors with
//! f32 compute; separate f32 copies with bf16 compute), AdamW's moments, the global
//! gradient norm, clipping, and the update that refreshes the compute copies. The maths of
//! one AdamW step and the schedules are [`super::optim`].

use anyhow::Context;

use super::model::{Master, TrainModel};
use super::optim::{clip_factor, decays, step_scalars, AdamW, Moments};
use crate::backend::Backend;
use crate::tensor::{DType, HostData, Tensor};

/// Masters and moments of one training run.
pub struct Optimizer<B: Backend> {
    /// f32 masters when compute runs in another dtype; `None` when the model's own f32
    /// tensors are the masters (no copy).
    masters: Option<Vec<Tensor<B>>>,
    /// `[m, v]` per trainable tensor, f32, in [`TrainModel::named_mut`] order.
    moments: Vec<[Tensor<B>; 2]>,
    /// AdamW's hyper-parameters.
    pub hparams: AdamW,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
}

impl<B: Backend> Optimizer<B> {
    /// The optimiser for `model` (loaded in f32) computing in `dtype`: moments from `saved`
    /// (a checkpoint's, in the model's order) or zero, and with a compute dtype other than
    /// f32 the model cast to it after its f32 masters are copied off.
    pub fn new(
        be: &B,
        model: &mut TrainModel<B>,
        dtype: DType,
        hparams: AdamW,
        max_grad_norm: f64,
        saved: Option<&[Moments]>,
    ) -> anyhow::Result<Self> {
        let mut moments = Vec::new();
        for (k, (name, t)) in model.named_mut().into_iter().enumerate() {
            let pair = match saved {
                Some(s) => {
                    let mo = s
                        .get(k)
                        .with_context(|| format!("no saved moments for {name}"))?;
                    [
                        be.upload(HostData::F32(&mo.m), t.shape())?,
                        be.upload(HostData::F32(&mo.v), t.shape())?,
                    ]
                }
                None => [
                    be.zeros(t.shape(), DType::F32)?,
                    be.zeros(t.shape(), DType::F32)?,
                ],
            };
            moments.push(pair);
        }
        let masters = if dtype == DType::F32 {
            None
        } else {
            let copies = model
                .named_mut()
                .into_iter()
                .map(|(_, t)| be.cast(t, DType::F32))
                .collect::<crate::error::Result<Vec<_>>>()?;
            model.cast(be, dtype)?;
            Some(copies)
        };
        Ok(Optimizer {
            masters,
            moments,
            hparams,
            max_grad_norm,
        })
    }

    /// The global L2 norm of all gradients: each tensor's `Σ g²` in f64 on its backend,
    /// added in tensor order (the same bits on any thread count).
    pub fn grad_norm(be: &B, grads: &[Option<Tensor<B>>]) -> anyhow::Result<f64> {
        let mut total = 0f64;
        for g in grads.iter().flatten() {
            total += be.sum_squares(g)?;
        }
        Ok(total.sqrt())
    }

    /// The factor gradients of global norm `norm` are scaled by.
    pub fn clip(&self, norm: f64) -> f32 {
        if self.max_grad_norm > 0.0 {
            clip_factor(norm, self.max_grad_norm)
        } else {
            1.0
        }
    }

    /// AdamW step `t` (1-based) at rate `lr`, gradients scaled by `clip`, on every tensor
    /// that has a gradient (PyTorch skips parameters whose `grad` is `None`); then the
    /// compute copies are refreshed from the masters on the device.
    pub fn update(
        &mut self,
        be: &B,
        model: &mut TrainModel<B>,
        grads: &[Option<Tensor<B>>],
        t: u64,
        lr: f32,
        clip: f32,
    ) -> anyhow::Result<()> {
        let mut named = model.named_mut();
        let params: Vec<(&str, &mut Tensor<B>)> = match &mut self.masters {
            None => named
                .iter_mut()
                .map(|(n, t)| (n.as_str(), &mut **t))
                .collect(),
            Some(masters) => named
                .iter()
                .map(|(n, _)| n.as_str())
                .zip(masters.iter_mut())
                .collect(),
        };
        for (((name, p), [m, v]), g) in params.into_iter().zip(self.moments.iter_mut()).zip(grads) {
            if let Some(g) = g {
                let s = step_scalars(t, lr, decays(name), clip, &self.hparams);
                be.adamw(p, g, m, v, &s)
                    .with_context(|| format!("AdamW on {name}"))?;
            }
        }
        if let Some(masters) = &self.masters {
            for ((_, t), m) in named.iter_mut().zip(masters.iter()) {
                **t = be.cast(m, t.dtype())?;
            }
        }
        Ok(())
    }

    /// The f32 master weights with their names, copied to the host.
    pub fn masters_host(&self, be: &B, model: &mut TrainModel<B>) -> anyhow::Result<Vec<Master>> {
        let named = model.named_mut();
        let tensors: Vec<&Tensor<B>> = match &self.masters {
            Some(m) => m.iter().collect(),
            None => named.iter().map(|(_, t)| &**t).collect(),
        };
        named
            .iter()
            .zip(tensors)
            .map(|((name, _), t)| {
                Ok(Master {
                    shape: t.shape().to_vec(),
                    data: be.to_vec_f32(t)?,
                    name: name.clone(),
                })
            })
            .collect()
    }

    /// The moments `[m, v]` per tensor, copied to the host.
    pub fn moments_host(&self, be: &B) -> anyhow::Result<Vec<[Vec<f32>; 2]>> {
        self.moments
            .iter()
            .map(|[m, v]| Ok([be.to_vec_f32(m)?, be.to_vec_f32(v)?]))
            .collect()
    }
}
