//! Classic BERT (Devlin et al., 2019) as Hugging Face `BertModel` computes it: word + absolute
//! position + token-type embeddings, separate query/key/value projections, GELU MLP,
//! post-LayerNorm. This is the architecture of the k-mer DNABERT models.

use anyhow::Result;
use candle_core::Tensor;

use crate::model::config::ModelConfig;
use crate::model::layers::{key_padding_bias, Embedding, LayerNorm};
use crate::model::params::ParamBuilder;
use crate::ops::{gelu, qkv_attention, ForwardCtx};
use crate::peft::Linear;

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

pub struct BertEncoder {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    max_positions: usize,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl BertEncoder {
    pub fn build(b: &mut ParamBuilder, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let i = cfg.intermediate_size;
        let std = cfg.initializer_range;
        let eps = cfg.layer_norm_eps;
        let emb = |b: &mut ParamBuilder, n: &str, rows: usize| {
            Embedding::build(b, &format!("bert.embeddings.{n}"), rows, h, std)
        };
        let word = emb(b, "word_embeddings", cfg.vocab_size)?;
        let position = emb(b, "position_embeddings", cfg.max_position_embeddings)?;
        let token_type = emb(b, "token_type_embeddings", cfg.type_vocab_size)?;
        let emb_norm = LayerNorm::build(b, "bert.embeddings.LayerNorm", h, eps)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("bert.encoder.layer.{l}");
            let lin = |b: &mut ParamBuilder, n: &str, i_dim: usize, o_dim: usize| {
                Linear::build(b, &format!("{p}.{n}"), i_dim, o_dim, true, std)
            };
            layers.push(Layer {
                query: lin(b, "attention.self.query", h, h)?,
                key: lin(b, "attention.self.key", h, h)?,
                value: lin(b, "attention.self.value", h, h)?,
                attn_out: lin(b, "attention.output.dense", h, h)?,
                attn_norm: LayerNorm::build(b, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
                intermediate: lin(b, "intermediate.dense", h, i)?,
                output: lin(b, "output.dense", i, h)?,
                out_norm: LayerNorm::build(b, &format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        Ok(BertEncoder {
            word,
            position,
            token_type,
            emb_norm,
            layers,
            heads: cfg.num_attention_heads,
            hidden: h,
            max_positions: cfg.max_position_embeddings,
            hidden_dropout: cfg.hidden_dropout_prob,
            attention_dropout: cfg.attention_probs_dropout_prob,
        })
    }

    pub fn word_embeddings(&self) -> &Tensor {
        self.word.table()
    }

    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.max_positions {
            candle_core::bail!(
                "sequence of {t} tokens exceeds max_position_embeddings {}; lower --max-length",
                self.max_positions
            );
        }
        let (h, nh) = (self.hidden, self.heads);
        let dev = ids.device();
        let positions = Tensor::arange(0u32, t as u32, dev)?.reshape((1, t))?;
        let types = Tensor::zeros((b, t), candle_core::DType::U32, dev)?;
        let x = ctx
            .probe_word_embeddings(self.word.forward(ids)?)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .broadcast_add(&self.token_type.forward(&types)?)?;
        // The layers work on (batch * seq, hidden): no reshape nodes around every product.
        let x = x.reshape((b * t, h))?;
        let mut x = ctx.dropout(&self.emb_norm.forward(&x)?, self.hidden_dropout)?;
        let pad = key_padding_bias(mask, nh, x.dtype())?;
        for layer in &self.layers {
            // q, k and v side by side, the layout the attention op reads (DNABERT-2's `Wqkv`).
            let qkv = Tensor::cat(
                &[
                    layer.query.forward(&x, ctx)?,
                    layer.key.forward(&x, ctx)?,
                    layer.value.forward(&x, ctx)?,
                ],
                1,
            )?;
            let attn = qkv_attention(&qkv, &pad, nh, t, self.attention_dropout, ctx)?;
            let attn = ctx.dropout(&layer.attn_out.forward(&attn, ctx)?, self.hidden_dropout)?;
            x = layer.attn_norm.forward(&(attn + &x)?)?;
            let inter = gelu(&layer.intermediate.forward(&x, ctx)?)?;
            let out = ctx.dropout(&layer.output.forward(&inter, ctx)?, self.hidden_dropout)?;
            x = layer.out_norm.forward(&(out + &x)?)?;
        }
        x.reshape((b, t, h))
    }
}
