//! AdamW with decoupled weight decay (Loshchilov & Hutter), exactly as `torch.optim.AdamW` steps,
//! without decay on biases and LayerNorm weights; the learning-rate schedule; gradient clipping.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

use crate::train::config::Scheduler;

/// One trainable tensor and its moment estimates.
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    slots: Vec<Slot>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken so far (for bias correction).
    pub t: usize,
}

/// Biases and LayerNorm parameters get no weight decay, as in the BERT recipes.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("layernorm"))
}

impl AdamW {
    pub fn new<'a>(
        vars: impl IntoIterator<Item = (&'a String, &'a Var)>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    decay: decays(name),
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            slots,
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
        })
    }

    /// Applies one update with learning rate `lr` from gradients keyed by parameter name.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.name) else {
                continue;
            };
            slot.m = ((&slot.m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            slot.v = ((&slot.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mut p = slot.var.as_tensor().detach();
            if slot.decay && self.weight_decay > 0.0 {
                p = (p * (1.0 - lr * self.weight_decay))?;
            }
            let denom = ((slot.v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = ((&slot.m / denom)? * (lr / bc1))?;
            slot.var.set(&(p - update)?)?;
        }
        Ok(())
    }

    /// Moment estimates under `m.<name>` / `v.<name>`, for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
        }
        out
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, t: usize) -> Result<()> {
        for s in &mut self.slots {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .with_context(|| format!("optimizer state lacks `{k}`"))
            };
            s.m = get(format!("m.{}", s.name))?.to_device(s.var.device())?;
            s.v = get(format!("v.{}", s.name))?.to_device(s.var.device())?;
        }
        self.t = t;
        Ok(())
    }
}

/// Learning rate at optimiser step `step` (0-based) of `total`.
pub fn learning_rate(kind: Scheduler, peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_len = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_len).min(1.0);
    match kind {
        Scheduler::Constant => peak,
        Scheduler::Linear => peak * (1.0 - progress),
        Scheduler::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two AdamW steps on one parameter against the update rule recomputed by hand in f64.
    #[test]
    fn adamw_matches_hand_computed_update() {
        let var = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let name = "w".to_string();
        let mut opt = AdamW::new([(&name, &var)], 0.9, 0.999, 1e-8, 0.1).unwrap();
        let grads_seq = [[0.5f64, -1.0], [0.25, 2.0]];
        let (mut p, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        let lr = 0.01;
        for (t, g) in grads_seq.iter().enumerate() {
            let gt = Tensor::from_vec(g.map(|x| x as f32).to_vec(), 2, &Device::Cpu).unwrap();
            opt.step(&HashMap::from([(name.clone(), gt)]), lr).unwrap();
            let t = (t + 1) as i32;
            for i in 0..2 {
                p[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let denom = (v[i] / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8;
                p[i] -= lr / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
    }

    #[test]
    fn no_decay_on_bias_and_layernorm() {
        assert!(decays("bert.encoder.layer.0.mlp.wo.weight"));
        assert!(!decays("bert.encoder.layer.0.mlp.wo.bias"));
        assert!(!decays("bert.embeddings.LayerNorm.weight"));
        assert!(!decays("bert.encoder.layer.0.mlp.layernorm.weight"));
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |k, s| learning_rate(k, 1.0, s, 10, 110);
        assert!((lr(Scheduler::Linear, 0) - 0.1).abs() < 1e-12);
        assert!((lr(Scheduler::Linear, 9) - 1.0).abs() < 1e-12);
        assert!((lr(Scheduler::Linear, 60) - 0.5).abs() < 1e-12);
        assert!((lr(Scheduler::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!(lr(Scheduler::Cosine, 109) < 0.001);
        assert_eq!(lr(Scheduler::Constant, 100), 1.0);
    }

    #[test]
    fn clipping_bounds_global_norm() {
        let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
        let mut g = HashMap::from([
            ("a".to_string(), t(vec![3.0])),
            ("b".to_string(), t(vec![4.0])),
        ]);
        let before = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-9);
        let a = g["a"].to_vec1::<f32>().unwrap()[0];
        let b = g["b"].to_vec1::<f32>().unwrap()[0];
        assert!(((a * a + b * b).sqrt() - 1.0).abs() < 1e-4);
    }
}
