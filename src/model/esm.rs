//! The ESM encoder family as the Nucleotide Transformer checkpoints use it (Dalla-Torre et al.,
//! 2024), matching Hugging Face's `EsmModel` and the Nucleotide Transformer v2 code that extends
//! it: pre-LayerNorm layers with a final LayerNorm, separate query/key/value, learned positions
//! counted from `pad_token_id + 1` (v1) or rotary embeddings (v2), an exact-GELU feed-forward
//! block (v1) or a SwiGLU one without biases (v2), and ESM's "token dropout" rescaling of the
//! embeddings.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{Map, Value};

use crate::model::config::ModelConfig;
use crate::model::layers::{key_padding_bias, Embedding, LayerNorm};
use crate::model::params::ParamBuilder;
use crate::ops::{gelu, qkv_attention, rotary, swiglu, ForwardCtx};
use crate::peft::Linear;

/// The fraction of tokens ESM's pre-training replaced by `<mask>` (15 % selected, 80 % of those
/// masked): with token dropout on, embeddings are scaled as if that many were zeroed.
const MASK_RATIO_TRAIN: f64 = 0.15 * 0.8;

/// Where tokens learn their positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// A learned table indexed from `pad_token_id + 1` (fairseq's convention).
    Absolute,
    /// Rotary embeddings on the query and key of every head.
    Rotary,
}

/// The feed-forward block between the two residual additions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedForward {
    /// `dense(intermediate)`, exact GELU, `dense(hidden)`, with biases (Hugging Face `EsmModel`).
    Gelu,
    /// One projection to twice the intermediate width, SiLU of the first half times the second
    /// (Nucleotide Transformer v2); `bias` is its `add_bias_fnn`.
    SwiGlu { bias: bool },
}

/// The `config.json` fields that shape an ESM encoder beyond the BERT ones.
#[derive(Clone, Debug, PartialEq)]
pub struct EsmOptions {
    pub positions: Positions,
    /// The rotary base (`rope_theta`, 10000 when absent).
    pub rope_theta: f64,
    pub feed_forward: FeedForward,
    pub token_dropout: bool,
    /// A LayerNorm on the embeddings before the first layer (ESM-1b; off in the Nucleotide
    /// Transformers).
    pub emb_layer_norm_before: bool,
    pub pad_token_id: u32,
    pub mask_token_id: u32,
}

impl EsmOptions {
    /// Reads the options from a config's fields. `add_bias_fnn` only exists in the Nucleotide
    /// Transformer v2 configuration class, whose feed-forward block is always SwiGLU, so its
    /// presence selects SwiGLU; a checkpoint of the other kind then fails on its weight shapes.
    pub fn from_config(raw: &Map<String, Value>) -> Result<Self> {
        let positions = match raw
            .get("position_embedding_type")
            .and_then(Value::as_str)
            .unwrap_or("absolute")
        {
            "absolute" => Positions::Absolute,
            "rotary" => Positions::Rotary,
            other => bail!(
                "position_embedding_type {other:?} is not supported for ESM models \
                 (absolute or rotary)"
            ),
        };
        let flag = |name: &str| -> Result<Option<bool>> {
            match raw.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => bail!("field `{name}` should be true or false, found {other}"),
            }
        };
        let feed_forward = match flag("add_bias_fnn")? {
            Some(bias) => FeedForward::SwiGlu { bias },
            None => FeedForward::Gelu,
        };
        if flag("is_folding_model")? == Some(true) {
            bail!("ESMFold (is_folding_model) is a structure predictor, not an encoder dnatune fine-tunes");
        }
        let token_id = |name: &str| -> Result<u32> {
            raw.get(name)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .with_context(|| format!("an ESM config needs the integer field `{name}`"))
        };
        let rope_theta = match raw.get("rope_theta") {
            None | Some(Value::Null) => 10000.0,
            Some(v) => v.as_f64().filter(|t| *t > 1.0).with_context(|| {
                format!("field `rope_theta` should be a number above 1, found {v}")
            })?,
        };
        Ok(EsmOptions {
            positions,
            rope_theta,
            feed_forward,
            token_dropout: flag("token_dropout")?.unwrap_or(false),
            emb_layer_norm_before: flag("emb_layer_norm_before")?.unwrap_or(false),
            pad_token_id: token_id("pad_token_id")?,
            mask_token_id: token_id("mask_token_id")?,
        })
    }
}

impl std::fmt::Display for EsmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.positions {
            Positions::Absolute => write!(f, "learned positions from {}", self.pad_token_id + 1)?,
            Positions::Rotary => write!(f, "rotary positions (theta {})", self.rope_theta)?,
        }
        match self.feed_forward {
            FeedForward::Gelu => f.write_str(", GELU feed-forward")?,
            FeedForward::SwiGlu { bias: false } => f.write_str(", SwiGLU without biases")?,
            FeedForward::SwiGlu { bias: true } => f.write_str(", SwiGLU with biases")?,
        }
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            ", token dropout {}, embedding LayerNorm {}",
            on(self.token_dropout),
            on(self.emb_layer_norm_before)
        )
    }
}

struct Layer {
    attn_norm: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    ffn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
}

pub struct EsmEncoder {
    word: Embedding,
    position: Option<Embedding>,
    emb_norm: Option<LayerNorm>,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    opts: EsmOptions,
    heads: usize,
    hidden: usize,
    max_positions: usize,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl EsmEncoder {
    pub fn build(b: &mut ParamBuilder, cfg: &ModelConfig) -> Result<Self> {
        let opts = EsmOptions::from_config(&cfg.raw)?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (std, eps) = (cfg.initializer_range, cfg.layer_norm_eps);
        if opts.positions == Positions::Rotary && !cfg.head_dim().is_multiple_of(2) {
            bail!(
                "rotary embeddings need an even head size, got {}",
                cfg.head_dim()
            );
        }
        let word = Embedding::build(b, "esm.embeddings.word_embeddings", cfg.vocab_size, h, std)?;
        let position = match opts.positions {
            Positions::Absolute => Some(Embedding::build(
                b,
                "esm.embeddings.position_embeddings",
                cfg.max_position_embeddings,
                h,
                std,
            )?),
            Positions::Rotary => None,
        };
        let emb_norm = opts
            .emb_layer_norm_before
            .then(|| LayerNorm::build(b, "esm.embeddings.layer_norm", h, eps))
            .transpose()?;
        let (inter_out, ffn_bias) = match opts.feed_forward {
            FeedForward::Gelu => (i, true),
            FeedForward::SwiGlu { bias } => (2 * i, bias),
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("esm.encoder.layer.{l}");
            let lin = |b: &mut ParamBuilder, n: &str, in_dim: usize, out: usize, bias: bool| {
                Linear::build(b, &format!("{p}.{n}"), in_dim, out, bias, std)
            };
            layers.push(Layer {
                attn_norm: LayerNorm::build(b, &format!("{p}.attention.LayerNorm"), h, eps)?,
                query: lin(b, "attention.self.query", h, h, true)?,
                key: lin(b, "attention.self.key", h, h, true)?,
                value: lin(b, "attention.self.value", h, h, true)?,
                attn_out: lin(b, "attention.output.dense", h, h, true)?,
                ffn_norm: LayerNorm::build(b, &format!("{p}.LayerNorm"), h, eps)?,
                intermediate: lin(b, "intermediate.dense", h, inter_out, ffn_bias)?,
                output: lin(b, "output.dense", i, h, ffn_bias)?,
            });
        }
        let final_norm = LayerNorm::build(b, "esm.encoder.emb_layer_norm_after", h, eps)?;
        Ok(EsmEncoder {
            word,
            position,
            emb_norm,
            layers,
            final_norm,
            opts,
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

    /// Word (+ position) embeddings (batch, seq, hidden), rescaled for token dropout, before the
    /// optional LayerNorm.
    fn embed(&self, ids: &Tensor, mask: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let mut x = ctx.probe_word_embeddings(self.word.forward(ids)?)?;
        let dtype = x.dtype();
        if self.opts.token_dropout {
            // `<mask>` tokens embed as zeros, and every sequence is scaled by the kept fraction
            // pre-training saw over the fraction it keeps: 0.88 for a sequence without masks.
            let masked = ids.eq(self.opts.mask_token_id)?.to_dtype(dtype)?;
            let lengths = mask.to_dtype(dtype)?.sum_keepdim(1)?;
            let observed = masked.sum_keepdim(1)?.broadcast_div(&lengths)?;
            let scale = ((observed.affine(-1.0, 1.0)?.recip()?) * (1.0 - MASK_RATIO_TRAIN))?;
            let kept = masked.affine(-1.0, 1.0)?.broadcast_mul(&scale)?;
            x = x.broadcast_mul(&kept.unsqueeze(2)?)?;
        }
        if let Some(position) = &self.position {
            // Real tokens sit at pad_token_id + 1, + 2, ... (right padding). Padded slots take
            // other rows than the reference gives them (it zeroes them too), which no real token
            // sees: padded keys are masked and pooling skips them.
            let first = self.opts.pad_token_id as usize + 1;
            if first + t > self.max_positions {
                candle_core::bail!(
                    "sequence of {t} tokens exceeds the {} positions this model has \
                     (max_position_embeddings {} minus pad_token_id + 1); lower --max-length",
                    self.max_positions.saturating_sub(first),
                    self.max_positions
                );
            }
            let positions =
                Tensor::arange(first as u32, (first + t) as u32, ids.device())?.reshape((1, t))?;
            x = x.broadcast_add(&position.forward(&positions)?)?;
        }
        Ok(x)
    }

    /// Hidden states (batch, seq, hidden) for `ids` and `mask` (both (batch, seq), u32).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (h, nh) = (self.hidden, self.heads);
        let mut x = self.embed(ids, mask, ctx)?.reshape((b * t, h))?;
        if let Some(norm) = &self.emb_norm {
            x = norm.forward(&x)?;
        }
        let dtype = x.dtype();
        let pad = key_padding_bias(mask, nh, dtype)?;
        for layer in &self.layers {
            let normed = layer.attn_norm.forward(&x)?;
            let mut qkv = Tensor::cat(
                &[
                    layer.query.forward(&normed, ctx)?,
                    layer.key.forward(&normed, ctx)?,
                    layer.value.forward(&normed, ctx)?,
                ],
                1,
            )?;
            if self.opts.positions == Positions::Rotary {
                // q and k turn by their positions; v does not.
                qkv = rotary(&qkv, t, h / nh, 2 * h, self.opts.rope_theta)?;
            }
            let attn = qkv_attention(&qkv, &pad, nh, t, self.attention_dropout, ctx)?;
            let attn = ctx.dropout(&layer.attn_out.forward(&attn, ctx)?, self.hidden_dropout)?;
            x = (x + attn)?;
            let inter = layer
                .intermediate
                .forward(&layer.ffn_norm.forward(&x)?, ctx)?;
            let act = match self.opts.feed_forward {
                FeedForward::Gelu => gelu(&inter)?,
                FeedForward::SwiGlu { .. } => swiglu(&inter)?,
            };
            let out = ctx.dropout(&layer.output.forward(&act, ctx)?, self.hidden_dropout)?;
            x = (x + out)?;
        }
        self.final_norm.forward(&x)?.reshape((b, t, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(fields: serde_json::Value) -> Map<String, Value> {
        let Value::Object(mut m) = json!({"pad_token_id": 1, "mask_token_id": 2}) else {
            unreachable!()
        };
        m.extend(fields.as_object().unwrap().clone());
        m
    }

    #[test]
    fn options_follow_the_config_and_bad_fields_are_named() {
        // transformers' own ESM config: learned positions, GELU.
        let v1 = EsmOptions::from_config(&config(json!({"token_dropout": true}))).unwrap();
        assert_eq!(v1.positions, Positions::Absolute);
        assert_eq!(v1.feed_forward, FeedForward::Gelu);
        assert_eq!(
            v1.to_string(),
            "learned positions from 2, GELU feed-forward, token dropout on, embedding LayerNorm off"
        );
        // The Nucleotide Transformer v2 config: rotary, `add_bias_fnn`, a null LayerNorm flag.
        let v2 = EsmOptions::from_config(&config(json!({
            "position_embedding_type": "rotary", "add_bias_fnn": false,
            "emb_layer_norm_before": null, "rope_theta": 500.0
        })))
        .unwrap();
        assert_eq!(v2.feed_forward, FeedForward::SwiGlu { bias: false });
        assert!(v2
            .to_string()
            .starts_with("rotary positions (theta 500), SwiGLU without biases"));
        for (fields, needle) in [
            (
                json!({"position_embedding_type": "relative_key"}),
                "relative_key",
            ),
            (json!({"token_dropout": "yes"}), "token_dropout"),
            (json!({"rope_theta": 0.5}), "rope_theta"),
            (json!({"is_folding_model": true}), "ESMFold"),
        ] {
            let err = EsmOptions::from_config(&config(fields))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
        let mut no_pad = config(json!({}));
        no_pad.remove("pad_token_id");
        let err = EsmOptions::from_config(&no_pad).unwrap_err().to_string();
        assert!(err.contains("pad_token_id"), "{err}");
    }
}
