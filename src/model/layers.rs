//! Small layers the encoders share.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::model::params::{Init, ParamBuilder};

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn build(b: &mut ParamBuilder, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: b.get(&format!("{name}.weight"), &[dim], Init::Ones)?,
            bias: b.get(&format!("{name}.bias"), &[dim], Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

pub struct Embedding {
    table: Tensor,
}

impl Embedding {
    pub fn build(
        b: &mut ParamBuilder,
        name: &str,
        rows: usize,
        dim: usize,
        std: f64,
    ) -> Result<Self> {
        Ok(Embedding {
            table: b.get(&format!("{name}.weight"), &[rows, dim], Init::Normal(std))?,
        })
    }

    /// Looks up `ids` (any shape, u32) and appends the embedding dimension.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.table.dim(1)?);
        self.table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(dims)
    }

    pub fn table(&self) -> &Tensor {
        &self.table
    }
}

/// The additive attention bias (batch, heads, seq, seq) that hides padded keys, for `mask`
/// (batch, seq), 1 on real tokens. Hugging Face uses the most negative float; any large negative
/// gives the same probabilities to float precision.
pub fn key_padding_bias(mask: &Tensor, heads: usize, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, t) = mask.dims2()?;
    ((mask.to_dtype(dtype)? - 1.0)? * 1e9)?
        .reshape((b, 1, 1, t))?
        .broadcast_as((b, heads, t, t))?
        .contiguous()
}
