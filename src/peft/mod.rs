//! Parameter-efficient fine-tuning: the one linear layer every model calls, holding a frozen or
//! trainable base weight and an optional LoRA adapter.
//!
//! LoRA (Hu et al., 2021): y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with A (r x in)
//! Kaiming-uniform and B (out x r) zero so training starts from the base model exactly. Parameter
//! names follow PEFT (`<module>.lora_A.weight`, `<module>.lora_B.weight`).

pub mod adapter;
pub mod bf16;
pub mod merge;
pub mod quant;

use std::sync::Arc;

use anyhow::Result;
use candle_core::Tensor;

use crate::model::params::{Init, ParamBuilder};
use crate::ops::{frozen_linear, trained_linear, ForwardCtx};
use bf16::{Bf16Weight, Precision};
use quant::QuantizedWeight;

/// LoRA hyper-parameters, as in PEFT's `LoraConfig`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module-name patterns: a module matches when its name equals a pattern or ends with
    /// `.pattern` (PEFT's rule for a list of names).
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The target pattern `module` matches, if any.
    pub fn matching_target(&self, module: &str) -> Option<&str> {
        self.target_modules
            .iter()
            .find(|t| module == t.as_str() || module.ends_with(&format!(".{t}")))
            .map(String::as_str)
    }
}

/// The low-rank update of one linear layer.
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

/// The base weight W (out, in) of a linear layer: f32 (trainable or frozen), trained in f32 with
/// its products in bf16 (full fine-tuning under `--precision bf16`), frozen and quantized for
/// QLoRA, or frozen in bf16 (LoRA under `--precision bf16`).
pub enum LinearBase {
    Dense(Tensor),
    Bf16Products(Tensor),
    Quantized(Arc<QuantizedWeight>),
    Bf16(Arc<Bf16Weight>),
}

/// A linear layer `y = x W^T + b` (+ LoRA). The weight is (out, in) as in PyTorch.
pub struct Linear {
    pub base: LinearBase,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Fetches `{name}.weight` (and `{name}.bias`) from the builder and, when `name` matches a
    /// LoRA target, creates the adapter.
    pub fn build(
        b: &mut ParamBuilder,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        std: f64,
    ) -> Result<Self> {
        let weight_name = format!("{name}.weight");
        let shape = [out_dim, in_dim];
        let base = match b.quantize_for(&weight_name) {
            Some(kind) => LinearBase::Quantized(b.get_quantized(
                &weight_name,
                &shape,
                Init::Normal(std),
                kind,
            )?),
            None if b.bf16_for(&weight_name) => {
                LinearBase::Bf16(b.get_bf16(&weight_name, &shape, Init::Normal(std))?)
            }
            None if b.bf16_products_for(&weight_name) => {
                LinearBase::Bf16Products(b.get(&weight_name, &shape, Init::Normal(std))?)
            }
            None => LinearBase::Dense(b.get(&weight_name, &shape, Init::Normal(std))?),
        };
        let bias = if bias {
            Some(b.get(&format!("{name}.bias"), &[out_dim], Init::Zeros)?)
        } else {
            None
        };
        let lora_cfg = b.lora.clone();
        let lora = match lora_cfg
            .as_ref()
            .and_then(|c| c.matching_target(name).map(|t| (c, t)))
        {
            Some((cfg, target)) => {
                b.lora_matched.insert(target.to_string());
                // Kaiming-uniform with a = sqrt(5), as torch.nn.Linear and PEFT initialise A.
                let bound = 1.0 / (in_dim as f64).sqrt();
                let a = b.get(
                    &format!("{name}.lora_A.weight"),
                    &[cfg.r, in_dim],
                    Init::Uniform(bound),
                )?;
                let bm = b.get(
                    &format!("{name}.lora_B.weight"),
                    &[out_dim, cfg.r],
                    Init::Zeros,
                )?;
                Some(LoraAdapter {
                    a,
                    b: bm,
                    scaling: cfg.scaling(),
                    dropout: cfg.dropout,
                })
            }
            None => None,
        };
        Ok(Linear { base, bias, lora })
    }

    /// `y = x W^T + b` (+ the adapter's update) over the last dimension of `x`. A 2-D `x` is
    /// used as it is (every reshape is a graph node whose backward pass copies the gradient),
    /// unless its rows are strided, as the [CLS] rows picked for the pooler are: cuBLAS takes
    /// only packed operands, so those are copied (a no-op for a contiguous `x`).
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims
            .last()
            .expect("a linear layer's input has a feature dimension");
        let x2 = match dims.len() {
            2 => x.contiguous()?,
            _ => x.reshape(((), in_dim))?,
        };
        // A trained bias (full fine-tuning) needs its gradient, which the frozen product skips.
        let trained_bias = self.bias.as_ref().is_some_and(|b| b.is_variable());
        let frozen_bias = self.bias.as_ref().filter(|_| !trained_bias);
        let full = 0..self.out_dim();
        // The frozen products add a frozen bias themselves and `trained_linear` any bias; a trained
        // bias on a quantized or bf16 base is added here.
        let (mut y, bias_added) = match &self.base {
            LinearBase::Dense(w) if w.is_variable() || trained_bias => (
                trained_linear(&x2, w, self.bias.as_ref(), Precision::F32)?,
                true,
            ),
            LinearBase::Bf16Products(w) => (
                trained_linear(&x2, w, self.bias.as_ref(), Precision::Bf16)?,
                true,
            ),
            LinearBase::Dense(w) => (frozen_linear(&x2, w, frozen_bias)?, true),
            LinearBase::Quantized(q) => (
                quant::quantized_linear(&x2, q, full, frozen_bias)?,
                !trained_bias,
            ),
            LinearBase::Bf16(w) => (bf16::bf16_linear(&x2, w, full, frozen_bias)?, !trained_bias),
        };
        if let (Some(b), false) = (&self.bias, bias_added) {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            // The adapter's low-rank input is scaled where it is r wide rather than after B.
            let hidden = (ctx.dropout(&x2, l.dropout)?.matmul(&l.a.t()?)? * l.scaling)?;
            y = (y + hidden.matmul(&l.b.t()?)?)?;
        }
        match dims.len() {
            2 => Ok(y),
            _ => {
                let mut out_dims = dims;
                *out_dims.last_mut().expect("non-empty shape") = self.out_dim();
                y.reshape(out_dims)
            }
        }
    }

    /// Output features (rows of W).
    pub fn out_dim(&self) -> usize {
        match &self.base {
            LinearBase::Dense(w) | LinearBase::Bf16Products(w) => w.dims()[0],
            LinearBase::Quantized(q) => q.shape().0,
            LinearBase::Bf16(w) => w.shape().0,
        }
    }
}
