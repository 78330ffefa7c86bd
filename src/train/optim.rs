//! AdamW with PyTorch's semantics, HF Trainer's learning-rate schedules and gradient-norm
//! clipping (SPEC §5). The arithmetic itself is `backend::adamw_host`, which every
//! backend's in-place `adamw` reproduces.

use crate::backend::{adamw_host, AdamWStep};

/// AdamW hyper-parameters (PyTorch defaults but the learning rate).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamW {
    /// Peak learning rate.
    pub lr: f32,
    /// First-moment decay β1.
    pub beta1: f32,
    /// Second-moment decay β2.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (not applied where [`decays`] says no).
    pub weight_decay: f32,
}

impl Default for AdamW {
    /// The paper's fine-tuning recipe: lr 1e-5, weight decay 0.01; β 0.9/0.999, eps 1e-8.
    fn default() -> Self {
        AdamW {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// First and second moments of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// Running mean of gradients.
    pub m: Vec<f32>,
    /// Running mean of squared gradients.
    pub v: Vec<f32>,
}

impl Moments {
    /// Zero moments for `n` elements.
    pub fn zeros(n: usize) -> Self {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// Whether a parameter gets weight decay: as the HF Trainer decides, not biases and not
/// LayerNorm weights.
pub fn decays(name: &str) -> bool {
    !(name.ends_with("bias") || name.contains("LayerNorm") || name.contains("layer_norm"))
}

/// One AdamW step at optimiser step `t` (1-based) with learning rate `lr` (the schedule's),
/// as `torch.optim.AdamW`: decay `p *= 1 - lr·wd` first, then
/// `p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)`.
pub fn step(p: &mut [f32], g: &[f32], mo: &mut Moments, t: u64, lr: f32, decay: bool, h: &AdamW) {
    step_slices(p, g, &mut mo.m, &mut mo.v, t, lr, decay, h);
}

/// The backend scalars of AdamW step `t` (1-based) at rate `lr`, gradients scaled by
/// `grad_scale` (clipping).
pub fn step_scalars(t: u64, lr: f32, decay: bool, grad_scale: f32, h: &AdamW) -> AdamWStep {
    let bc1 = 1.0 - (h.beta1 as f64).powi(t as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(t as i32);
    AdamWStep {
        grad_scale,
        beta1: h.beta1,
        beta2: h.beta2,
        eps: h.eps,
        step_size: (lr as f64 / bc1) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
        decay: if decay { lr * h.weight_decay } else { 0.0 },
    }
}

/// [`step`] on matching slices of a parameter, its gradient and its moments.
#[allow(clippy::too_many_arguments)]
pub fn step_slices(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    t: u64,
    lr: f32,
    decay: bool,
    h: &AdamW,
) {
    adamw_host(p, g, m, v, &step_scalars(t, lr, decay, 1.0, h));
}

/// A learning-rate schedule over optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// The peak rate throughout (HF `constant`: no warm-up).
    Constant,
    /// Linear warm-up from 0 over `warmup` steps, then linear decay to 0 at `total`.
    Linear {
        /// Warm-up steps: `ceil(warmup_ratio · total)` as HF computes them.
        warmup: u64,
        /// Total optimiser steps.
        total: u64,
    },
}

impl Schedule {
    /// A linear schedule with HF's warm-up rounding.
    pub fn linear(warmup_ratio: f64, total: u64) -> Self {
        Schedule::Linear {
            warmup: (warmup_ratio * total as f64).ceil() as u64,
            total,
        }
    }

    /// The factor on the peak rate for 0-based step `k` (HF steps the scheduler after the
    /// optimiser, so step k uses `lambda(k)`; with warm-up the first step's rate is 0).
    pub fn factor(&self, k: u64) -> f32 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::Linear { warmup, total } => {
                if k < warmup {
                    k as f32 / warmup.max(1) as f32
                } else {
                    (total.saturating_sub(k)) as f32 / total.saturating_sub(warmup).max(1) as f32
                }
            }
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_`'s factor for gradients of global L2 norm `norm`:
/// `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_steps_by_hand() {
        let h = AdamW {
            lr: 0.1,
            weight_decay: 0.5,
            ..AdamW::default()
        };
        let mut p = vec![1.0f32, -2.0];
        let g = vec![0.5f32, -0.25];
        let mut mo = Moments::zeros(2);
        step(&mut p, &g, &mut mo, 1, 0.1, true, &h);
        // Decay: p *= 1 - 0.05 -> [0.95, -1.9]. Step 1: m̂ = g, v̂ = g², update lr·g/(|g|+eps).
        let want = [
            0.95 - 0.1 * 0.5 / (0.5 + 1e-8),
            -1.9 + 0.1 * 0.25 / (0.25 + 1e-8),
        ];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b as f32).abs() < 1e-6, "{a} vs {b}");
        }
        // Step 2 without decay, gradient flipped: m = 0.9·0.05 - 0.05 = -0.005 (first
        // element), v = 0.999·0.00025 + 0.00025.
        let p1 = p[0];
        step(&mut p, &[-0.5, 0.0], &mut mo, 2, 0.1, false, &h);
        let (m, v) = (0.9f64 * 0.05 - 0.1 * 0.5, 0.999f64 * 0.00025 + 0.001 * 0.25);
        let upd = 0.1 / (1.0 - 0.81) * m / ((v).sqrt() / (1.0f64 - 0.998001).sqrt() + 1e-8);
        assert!(
            (p[0] as f64 - (p1 as f64 - upd)).abs() < 1e-6,
            "{} vs {}",
            p[0],
            p1 as f64 - upd
        );
        // torch.optim.AdamW (torch 2.15, same hyper-parameters, weight decay set to 0 before
        // the second step) gives [0.85, -1.8] after step 1 and these after step 2.
        assert!(
            (p[0] - 0.855_263_2).abs() < 1e-6 && (p[1] + 1.732_994_1).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn schedules_match_hf() {
        let s = Schedule::linear(0.1, 95);
        assert_eq!(
            s,
            Schedule::Linear {
                warmup: 10,
                total: 95
            }
        );
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(5), 0.5);
        assert_eq!(s.factor(10), 1.0);
        assert!((s.factor(50) - 45.0 / 85.0).abs() < 1e-7);
        assert_eq!(s.factor(95), 0.0);
        assert_eq!(s.factor(200), 0.0);
        assert_eq!(Schedule::Constant.factor(7), 1.0);
    }

    #[test]
    fn decay_and_clipping_rules() {
        assert!(decays("encoder.layer.0.attention.self.query.weight"));
        assert!(!decays("encoder.layer.0.attention.self.query.bias"));
        assert!(!decays("encoder.layer.3.output.LayerNorm.weight"));
        assert!(!decays("embeddings.LayerNorm.weight"));
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(4.0, 1.0) - 0.25).abs() < 1e-6);
    }
}
