//! `config.json` parsing and architecture detection.
//!
//! Real DNABERT-2 checkpoints carry no reliable `model_type` (an early revision said `"bert"`), so the
//! architecture is told apart by the fields only DNABERT-2 writes (`alibi_starting_size`, an `auto_map`
//! into `bert_layers`) and by the weight names (`Wqkv`, `gated_layers`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// The encoder families dnatune implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// DNABERT-2: ALiBi attention, fused `Wqkv`, gated GELU MLP, no position embeddings.
    Dnabert2,
    /// Classic BERT with absolute positions (the k-mer DNABERT models).
    Bert,
    /// ESM, as the Nucleotide Transformers use it: pre-LayerNorm, learned or rotary positions,
    /// GELU or SwiGLU feed-forward (see [`crate::model::esm`]).
    Esm,
}

impl Architecture {
    /// The prefix of the encoder's tensor names, as the Hugging Face classes save them.
    pub fn weight_prefix(self) -> &'static str {
        match self {
            Architecture::Dnabert2 | Architecture::Bert => "bert",
            Architecture::Esm => "esm",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Architecture::Dnabert2 => "DNABERT-2 (ALiBi, fused Wqkv, gated GELU)",
            Architecture::Bert => "BERT (absolute positions)",
            Architecture::Esm => "ESM / Nucleotide Transformer (pre-LayerNorm)",
        })
    }
}

/// Hyper-parameters of an encoder, in Hugging Face field names.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub layer_norm_eps: f64,
    pub type_vocab_size: usize,
    pub max_position_embeddings: usize,
    pub initializer_range: f64,
    /// Class count recorded in the config (`id2label` or `num_labels`), if any.
    pub num_labels: Option<usize>,
    /// The file as read, so fields dnatune does not model survive a round trip.
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// A fresh configuration for `init-model`. An ESM one takes the Nucleotide Transformer v2
    /// layout (rotary positions, SwiGLU without biases, no token dropout) and still needs its
    /// `pad_token_id` and `mask_token_id` from the tokenizer.
    pub fn new(
        architecture: Architecture,
        vocab_size: usize,
        layers: usize,
        hidden: usize,
        heads: usize,
        intermediate: usize,
    ) -> Result<Self> {
        let mut config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: intermediate,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: match architecture {
                Architecture::Dnabert2 | Architecture::Esm => 0.0,
                Architecture::Bert => 0.1,
            },
            layer_norm_eps: 1e-12,
            type_vocab_size: 2,
            max_position_embeddings: 512,
            initializer_range: 0.02,
            num_labels: None,
            raw: Map::new(),
        };
        if architecture == Architecture::Esm {
            for (key, value) in [
                ("position_embedding_type", json!("rotary")),
                ("add_bias_fnn", json!(false)),
                ("token_dropout", json!(false)),
                ("emb_layer_norm_before", json!(false)),
            ] {
                config.raw.insert(key.into(), value);
            }
        }
        config.validate()?;
        Ok(config)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
        ];
        for (name, value) in positive {
            if value == 0 {
                bail!("{name} must be positive");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        Ok(())
    }

    /// Reads `dir/config.json`; `weight_names` (possibly empty) helps tell the architecture apart.
    /// Returns the config and a sentence saying why the architecture was chosen.
    pub fn from_dir<'a>(
        dir: &Path,
        weight_names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(Self, String)> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let Value::Object(raw) = value else {
            bail!("{}: expected a JSON object", path.display());
        };
        Self::from_json(raw, weight_names).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json<'a>(
        raw: Map<String, Value>,
        weight_names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(Self, String)> {
        let (architecture, reason) = detect_architecture(&raw, weight_names);
        let usize_field = |name: &str| -> Result<usize> {
            raw.get(name)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .with_context(|| format!("missing or non-integer field `{name}`"))
        };
        let opt_f64 =
            |name: &str, default: f64| raw.get(name).and_then(Value::as_f64).unwrap_or(default);
        let num_labels = raw
            .get("id2label")
            .and_then(Value::as_object)
            .map(|m| m.len())
            .or_else(|| {
                raw.get("num_labels")
                    .and_then(Value::as_u64)
                    .map(|v| v as usize)
            });
        let config = ModelConfig {
            architecture,
            vocab_size: usize_field("vocab_size")?,
            hidden_size: usize_field("hidden_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads: usize_field("num_attention_heads")?,
            intermediate_size: usize_field("intermediate_size")?,
            hidden_dropout_prob: opt_f64("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob: opt_f64("attention_probs_dropout_prob", 0.0),
            layer_norm_eps: opt_f64("layer_norm_eps", 1e-12),
            type_vocab_size: raw
                .get("type_vocab_size")
                .and_then(Value::as_u64)
                .unwrap_or(2) as usize,
            max_position_embeddings: raw
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(512) as usize,
            initializer_range: opt_f64("initializer_range", 0.02),
            num_labels,
            raw,
        };
        config.validate()?;
        Ok((config, reason))
    }

    /// The `config.json` dnatune writes: the fields read (kept), updated with the modelled ones, in
    /// the field names the Python implementations expect.
    pub fn to_json(&self) -> Value {
        let mut out = self.raw.clone();
        let mut set = |k: &str, v: Value| {
            out.insert(k.to_string(), v);
        };
        set("vocab_size", json!(self.vocab_size));
        set("hidden_size", json!(self.hidden_size));
        set("num_hidden_layers", json!(self.num_hidden_layers));
        set("num_attention_heads", json!(self.num_attention_heads));
        set("intermediate_size", json!(self.intermediate_size));
        set("hidden_dropout_prob", json!(self.hidden_dropout_prob));
        set(
            "attention_probs_dropout_prob",
            json!(self.attention_probs_dropout_prob),
        );
        set("layer_norm_eps", json!(self.layer_norm_eps));
        set("type_vocab_size", json!(self.type_vocab_size));
        set(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        set("initializer_range", json!(self.initializer_range));
        set("hidden_act", json!("gelu"));
        match self.architecture {
            Architecture::Dnabert2 => {
                out.remove("model_type");
                out.entry("alibi_starting_size").or_insert(json!(512));
                out.entry("auto_map").or_insert(json!({
                    "AutoConfig": "configuration_bert.BertConfig",
                    "AutoModel": "bert_layers.BertModel",
                    "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
                    "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification"
                }));
            }
            Architecture::Bert => {
                out.insert("model_type".into(), json!("bert"));
                out.entry("pad_token_id").or_insert(json!(0));
                out.entry("position_embedding_type")
                    .or_insert(json!("absolute"));
            }
            // Nucleotide Transformer v2 configs name their own code in `auto_map` and no model
            // type; a model type would send transformers to its native class instead.
            Architecture::Esm if !out.contains_key("auto_map") => {
                out.insert("model_type".into(), json!("esm"));
            }
            Architecture::Esm => {}
        }
        let (classifier_class, mlm_class) = match self.architecture {
            Architecture::Dnabert2 | Architecture::Bert => {
                ("BertForSequenceClassification", "BertForMaskedLM")
            }
            Architecture::Esm => ("EsmForSequenceClassification", "EsmForMaskedLM"),
        };
        if let Some(n) = self.num_labels {
            let id2label: Map<String, Value> = (0..n)
                .map(|i| (i.to_string(), json!(format!("LABEL_{i}"))))
                .collect();
            let label2id: Map<String, Value> =
                (0..n).map(|i| (format!("LABEL_{i}"), json!(i))).collect();
            out.insert("id2label".into(), Value::Object(id2label));
            out.insert("label2id".into(), Value::Object(label2id));
            out.insert("architectures".into(), json!([classifier_class]));
        } else {
            out.entry("architectures").or_insert(json!([mlm_class]));
        }
        Value::Object(out)
    }
}

/// Decides DNABERT-2, ESM or classic BERT from config fields first, weight names second.
fn detect_architecture<'a>(
    raw: &Map<String, Value>,
    weight_names: impl IntoIterator<Item = &'a str>,
) -> (Architecture, String) {
    if raw.contains_key("alibi_starting_size") {
        return (
            Architecture::Dnabert2,
            "config.json has `alibi_starting_size`".into(),
        );
    }
    let auto_map_text = raw
        .get("auto_map")
        .map(|v| v.to_string())
        .unwrap_or_default();
    if auto_map_text.contains("bert_layers") {
        return (
            Architecture::Dnabert2,
            "config.json `auto_map` points to bert_layers".into(),
        );
    }
    if raw.get("model_type").and_then(Value::as_str) == Some("esm") {
        return (
            Architecture::Esm,
            "config.json has model_type \"esm\"".into(),
        );
    }
    if auto_map_text.contains("esm") {
        return (
            Architecture::Esm,
            "config.json `auto_map` points to ESM code (Nucleotide Transformer)".into(),
        );
    }
    let mut saw_bert_weights = false;
    for name in weight_names {
        if name.contains(".Wqkv.") || name.contains(".gated_layers.") {
            return (Architecture::Dnabert2, format!("weights hold `{name}`"));
        }
        if name.contains("emb_layer_norm_after") {
            return (Architecture::Esm, format!("weights hold `{name}`"));
        }
        if name.contains("attention.self.query.") || name.contains("position_embeddings") {
            saw_bert_weights = true;
        }
    }
    if saw_bert_weights {
        return (
            Architecture::Bert,
            "weights hold separate query/key/value and position embeddings".into(),
        );
    }
    (
        Architecture::Bert,
        "no DNABERT-2 field or weight found; assuming classic BERT".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Map<String, Value> {
        let Value::Object(m) = json!({
            "vocab_size": 4096, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "model_type": "bert"
        }) else {
            unreachable!()
        };
        m
    }

    #[test]
    fn dnabert2_detected_by_alibi_field_despite_bert_model_type() {
        let mut raw = base();
        raw.insert("alibi_starting_size".into(), json!(512));
        let (cfg, reason) = ModelConfig::from_json(raw, []).unwrap();
        assert_eq!(cfg.architecture, Architecture::Dnabert2);
        assert!(reason.contains("alibi"));
    }

    #[test]
    fn detection_falls_back_to_weight_names() {
        let (cfg, _) =
            ModelConfig::from_json(base(), ["bert.encoder.layer.0.attention.self.Wqkv.weight"])
                .unwrap();
        assert_eq!(cfg.architecture, Architecture::Dnabert2);
        let (cfg, _) =
            ModelConfig::from_json(base(), ["bert.encoder.layer.0.attention.self.query.weight"])
                .unwrap();
        assert_eq!(cfg.architecture, Architecture::Bert);
    }

    #[test]
    fn indivisible_heads_rejected_and_json_round_trips() {
        let mut raw = base();
        raw.insert("num_attention_heads".into(), json!(7));
        assert!(ModelConfig::from_json(raw, []).is_err());
        let mut cfg = ModelConfig::new(Architecture::Dnabert2, 4096, 2, 64, 4, 128).unwrap();
        cfg.num_labels = Some(3);
        let Value::Object(m) = cfg.to_json() else {
            panic!()
        };
        assert!(!m.contains_key("model_type"));
        let (back, _) = ModelConfig::from_json(m, []).unwrap();
        assert_eq!(back.architecture, Architecture::Dnabert2);
        assert_eq!(back.num_labels, Some(3));
        assert_eq!(back.intermediate_size, 128);
    }
}
