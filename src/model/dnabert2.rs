//! The DNABERT-2 encoder (Zhou et al., 2024), matching the Hugging Face reference implementation
//! so that its checkpoints load and give the same outputs: word + token-type embeddings (no
//! position embeddings), ALiBi attention through a fused `Wqkv`, a gated GELU MLP, post-LayerNorm.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::model::config::ModelConfig;
use crate::model::layers::{Embedding, LayerNorm};
use crate::model::params::ParamBuilder;
use crate::ops::{alibi_slopes, gated_gelu, qkv_attention, ForwardCtx};
use crate::peft::Linear;

struct Layer {
    wqkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    gated: Linear,
    wo: Linear,
    mlp_norm: LayerNorm,
}

pub struct Dnabert2Encoder {
    word: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    hidden_dropout: f64,
    attention_dropout: f64,
    slopes: Vec<f64>,
}

impl Dnabert2Encoder {
    pub fn build(b: &mut ParamBuilder, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let i = cfg.intermediate_size;
        let std = cfg.initializer_range;
        let eps = cfg.layer_norm_eps;
        let word = Embedding::build(b, "bert.embeddings.word_embeddings", cfg.vocab_size, h, std)?;
        let token_type = Embedding::build(
            b,
            "bert.embeddings.token_type_embeddings",
            cfg.type_vocab_size,
            h,
            std,
        )?;
        let emb_norm = LayerNorm::build(b, "bert.embeddings.LayerNorm", h, eps)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("bert.encoder.layer.{l}");
            layers.push(Layer {
                wqkv: Linear::build(b, &format!("{p}.attention.self.Wqkv"), h, 3 * h, true, std)?,
                attn_out: Linear::build(
                    b,
                    &format!("{p}.attention.output.dense"),
                    h,
                    h,
                    true,
                    std,
                )?,
                attn_norm: LayerNorm::build(b, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
                gated: Linear::build(b, &format!("{p}.mlp.gated_layers"), h, 2 * i, false, std)?,
                wo: Linear::build(b, &format!("{p}.mlp.wo"), i, h, true, std)?,
                mlp_norm: LayerNorm::build(b, &format!("{p}.mlp.layernorm"), h, eps)?,
            });
        }
        Ok(Dnabert2Encoder {
            word,
            token_type,
            emb_norm,
            layers,
            heads: cfg.num_attention_heads,
            hidden: h,
            hidden_dropout: cfg.hidden_dropout_prob,
            attention_dropout: cfg.attention_probs_dropout_prob,
            slopes: alibi_slopes(cfg.num_attention_heads),
        })
    }

    pub fn word_embeddings(&self) -> &Tensor {
        self.word.table()
    }

    /// The additive attention bias for a batch: ALiBi -slope_h * |i - j| plus -10000 on padded
    /// keys, as the reference does; built once per batch and shared by every layer.
    fn attention_bias(&self, mask: &Tensor, t: usize, dtype: DType) -> candle_core::Result<Tensor> {
        let mut alibi = Vec::with_capacity(self.heads * t * t);
        for slope in &self.slopes {
            for i in 0..t {
                for j in 0..t {
                    alibi.push((-slope * (i as f64 - j as f64).abs()) as f32);
                }
            }
        }
        let alibi =
            Tensor::from_vec(alibi, (1, self.heads, t, t), mask.device())?.to_dtype(dtype)?;
        let b = mask.dim(0)?;
        let pad = ((mask.to_dtype(dtype)? - 1.0)? * 10000.0)?.reshape((b, 1, 1, t))?;
        alibi.broadcast_add(&pad)
    }

    /// Hidden states (batch, seq, hidden) for `ids` and `mask` (both (batch, seq), u32).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let types = Tensor::zeros((b, t), candle_core::DType::U32, ids.device())?;
        let x = ctx
            .probe_word_embeddings(self.word.forward(ids)?)?
            .broadcast_add(&self.token_type.forward(&types)?)?;
        // The layers work on (batch * seq, hidden): no reshape nodes around every product.
        let x = x.reshape((b * t, self.hidden))?;
        let mut x = ctx.dropout(&self.emb_norm.forward(&x)?, self.hidden_dropout)?;
        let bias = self.attention_bias(mask, t, x.dtype())?;
        for layer in &self.layers {
            let qkv = layer.wqkv.forward(&x, ctx)?;
            let attn = qkv_attention(&qkv, &bias, self.heads, t, self.attention_dropout, ctx)?;
            let attn = ctx.dropout(&layer.attn_out.forward(&attn, ctx)?, self.hidden_dropout)?;
            x = layer.attn_norm.forward(&(attn + &x)?)?;
            let mlp = gated_gelu(&layer.gated.forward(&x, ctx)?)?;
            let mlp = ctx.dropout(&mlp, self.hidden_dropout)?;
            let mlp = layer.wo.forward(&mlp, ctx)?;
            x = layer.mlp_norm.forward(&(mlp + &x)?)?;
        }
        x.reshape((b, t, self.hidden))
    }
}
