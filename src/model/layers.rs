//! Small layers both encoders share.

use anyhow::Result;
use candle_core::Tensor;

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
