//! The masked-language-model head: dense -> GELU -> LayerNorm -> a decoder whose weight is the
//! word-embedding table itself (tied) plus its own bias. Keys follow Hugging Face: for BERT and
//! DNABERT-2 `cls.predictions.transform.dense`, `cls.predictions.transform.LayerNorm`,
//! `cls.predictions.decoder.bias`; for ESM `lm_head.dense`, `lm_head.layer_norm`, `lm_head.bias`,
//! and `lm_head.decoder.weight` when the config unties it (`tie_word_embeddings: false`, as the
//! Nucleotide Transformer v2 checkpoints).

use anyhow::Result;
use candle_core::Tensor;

use crate::model::config::{Architecture, ModelConfig};
use crate::model::layers::LayerNorm;
use crate::model::params::{Init, ParamBuilder};
use crate::model::Encoder;
use crate::ops::ForwardCtx;
use crate::peft::Linear;

pub struct MaskedLm {
    pub encoder: Encoder,
    transform: Linear,
    norm: LayerNorm,
    /// The decoder's own weight (vocab, hidden); `None` when tied to the word embeddings.
    decoder: Option<Tensor>,
    decoder_bias: Tensor,
}

/// Tensors a masked-LM model may create when its checkpoint lacks them (a fresh head).
pub fn is_mlm_head(name: &str) -> bool {
    name.starts_with("cls.predictions.") || name.starts_with("lm_head.")
}

/// The head's tensor names: (dense, LayerNorm, decoder weight, decoder bias).
fn mlm_head_names(arch: Architecture) -> [&'static str; 4] {
    match arch {
        Architecture::Dnabert2 | Architecture::Bert => [
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
            "cls.predictions.decoder.weight",
            "cls.predictions.decoder.bias",
        ],
        Architecture::Esm => [
            "lm_head.dense",
            "lm_head.layer_norm",
            "lm_head.decoder.weight",
            "lm_head.bias",
        ],
    }
}

impl MaskedLm {
    pub fn build(b: &mut ParamBuilder, cfg: &ModelConfig) -> Result<Self> {
        let encoder = Encoder::build(b, cfg)?;
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let [dense, norm, decoder, bias] = mlm_head_names(cfg.architecture);
        let transform = Linear::build(b, dense, h, h, true, std)?;
        let norm = LayerNorm::build(b, norm, h, cfg.layer_norm_eps)?;
        let tied = cfg.raw.get("tie_word_embeddings") != Some(&serde_json::Value::Bool(false));
        let decoder = match tied {
            true => None,
            false => Some(b.get(decoder, &[cfg.vocab_size, h], Init::Normal(std))?),
        };
        let decoder_bias = b.get(bias, &[cfg.vocab_size], Init::Zeros)?;
        Ok(MaskedLm {
            encoder,
            transform,
            norm,
            decoder,
            decoder_bias,
        })
    }

    /// Vocabulary logits (n, vocab) at the flat positions `positions` (u32 indices into
    /// batch * seq); only those rows go through the head, which is where the compute is.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        positions: &Tensor,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.encoder.forward(ids, mask, ctx)?;
        let h = hidden.dim(2)?;
        let picked = hidden.reshape(((), h))?.index_select(positions, 0)?;
        let x = crate::ops::gelu(&self.transform.forward(&picked, ctx)?)?;
        let x = self.norm.forward(&x)?;
        let decoder = self
            .decoder
            .as_ref()
            .unwrap_or_else(|| self.encoder.word_embeddings());
        x.matmul(&decoder.t()?)?.broadcast_add(&self.decoder_bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;
    use candle_core::{Device, Tensor};

    /// The decoder shares the embedding table: the gradient w.r.t. a token that appears only as a
    /// prediction target (never as input) must be non-zero, and it must come from the head.
    #[test]
    fn tied_decoder_sends_gradient_to_word_embeddings() {
        let cfg = ModelConfig::new(Architecture::Dnabert2, 12, 1, 8, 2, 16).unwrap();
        let mut b = ParamBuilder::fresh(4, &Device::Cpu);
        let model = MaskedLm::build(&mut b, &cfg).unwrap();
        let (params, _) = b.finish().unwrap();
        assert!(!params
            .entries
            .contains_key("cls.predictions.decoder.weight"));
        let ids = Tensor::new(&[[1u32, 5, 6, 4, 2]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let positions = Tensor::new(&[3u32], &Device::Cpu).unwrap();
        let logits = model
            .forward(&ids, &mask, &positions, &ForwardCtx::eval())
            .unwrap();
        assert_eq!(logits.dims(), &[1, 12]);
        let target = Tensor::new(&[9u32], &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &target).unwrap();
        let grads = loss.backward().unwrap();
        let table = params.entries["bert.embeddings.word_embeddings.weight"]
            .var
            .clone()
            .unwrap();
        let g: Vec<Vec<f32>> = grads.get(&table).unwrap().to_vec2().unwrap();
        // Token 9 is never an input: its row's gradient can only come through the tied decoder.
        assert!(g[9].iter().any(|v| v.abs() > 1e-6), "{:?}", g[9]);
        assert!(
            g[10].iter().any(|v| v.abs() > 1e-9),
            "softmax pushes other rows down too"
        );
    }
}
