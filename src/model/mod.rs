//! Encoders (DNABERT-2, classic BERT, ESM / Nucleotide Transformer), the sequence-classification
//! head on top, and loading and saving Hugging Face-style model directories.

pub mod bert;
pub mod checkpoint;
pub mod config;
pub mod dnabert2;
pub mod esm;
pub mod inspect;
pub mod layers;
pub mod mlm;
pub mod params;
pub mod record;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::ops::ForwardCtx;
use crate::peft::{Linear, LoraConfig};
use config::{Architecture, ModelConfig};
use params::{is_head, BuildReport, ParamBuilder, ParamStore, Trainable};

/// How a sequence is summarised before the pooler: the [CLS] token (DNABERT-2's default) or
/// the mean over real tokens.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    #[default]
    Cls,
    Mean,
}

impl Pooling {
    /// The name on the command line and in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        }
    }
}

pub enum Encoder {
    Dnabert2(dnabert2::Dnabert2Encoder),
    Bert(bert::BertEncoder),
    Esm(esm::EsmEncoder),
}

impl Encoder {
    pub fn build(b: &mut ParamBuilder, cfg: &ModelConfig) -> Result<Self> {
        Ok(match cfg.architecture {
            Architecture::Dnabert2 => Encoder::Dnabert2(dnabert2::Dnabert2Encoder::build(b, cfg)?),
            Architecture::Bert => Encoder::Bert(bert::BertEncoder::build(b, cfg)?),
            Architecture::Esm => Encoder::Esm(esm::EsmEncoder::build(b, cfg)?),
        })
    }

    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        match self {
            Encoder::Dnabert2(e) => e.forward(ids, mask, ctx),
            Encoder::Bert(e) => e.forward(ids, mask, ctx),
            Encoder::Esm(e) => e.forward(ids, mask, ctx),
        }
    }

    /// The token embedding table (vocab, hidden), which the masked-LM decoder shares.
    pub fn word_embeddings(&self) -> &Tensor {
        match self {
            Encoder::Dnabert2(e) => e.word_embeddings(),
            Encoder::Bert(e) => e.word_embeddings(),
            Encoder::Esm(e) => e.word_embeddings(),
        }
    }
}

/// The names of the head's two products, (dense + tanh, classes), as each family's Hugging Face
/// `...ForSequenceClassification` saves them.
pub fn head_names(arch: Architecture) -> (&'static str, &'static str) {
    match arch {
        Architecture::Dnabert2 | Architecture::Bert => ("bert.pooler.dense", "classifier"),
        Architecture::Esm => ("classifier.dense", "classifier.out_proj"),
    }
}

/// Encoder + pooler (dense + tanh) + classifier: Hugging Face's `BertForSequenceClassification`,
/// or `EsmForSequenceClassification` (the same head under other names, dropout also before it).
pub struct SequenceClassifier {
    encoder: Encoder,
    pooler: Linear,
    classifier: Linear,
    pooling: Pooling,
    dropout: f64,
    dropout_before_pooler: bool,
    pub num_labels: usize,
}

impl SequenceClassifier {
    pub fn build(
        b: &mut ParamBuilder,
        cfg: &ModelConfig,
        num_labels: usize,
        pooling: Pooling,
    ) -> Result<Self> {
        let encoder = Encoder::build(b, cfg)?;
        let h = cfg.hidden_size;
        let std = cfg.initializer_range;
        let (pooler_name, classifier_name) = head_names(cfg.architecture);
        let pooler = Linear::build(b, pooler_name, h, h, true, std)?;
        let classifier = Linear::build(b, classifier_name, h, num_labels, true, std)?;
        Ok(SequenceClassifier {
            encoder,
            pooler,
            classifier,
            pooling,
            dropout: cfg.hidden_dropout_prob,
            dropout_before_pooler: cfg.architecture == Architecture::Esm,
            num_labels,
        })
    }

    /// The token embedding table (vocab, hidden).
    pub fn word_embeddings(&self) -> &Tensor {
        self.encoder.word_embeddings()
    }

    /// Logits (batch, classes) for `ids` and `mask` (both (batch, seq), u32).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.encoder.forward(ids, mask, ctx)?;
        let summary = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
                let total = hidden.broadcast_mul(&m)?.sum(1)?;
                total.broadcast_div(&m.sum(1)?)?
            }
        };
        let summary = match self.dropout_before_pooler {
            true => ctx.dropout(&summary, self.dropout)?,
            false => summary,
        };
        let pooled = self.pooler.forward(&summary, ctx)?.tanh()?;
        let pooled = ctx.dropout(&pooled, self.dropout)?;
        self.classifier.forward(&pooled, ctx)
    }
}

/// What to build from a model directory.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Class count the data needs; checked against a classifier found in the checkpoint.
    pub num_labels: Option<usize>,
    pub trainable: Trainable,
    pub lora: Option<LoraConfig>,
    pub pooling: Pooling,
    /// Seed for whatever is initialised (pooler, classifier, adapters).
    pub seed: u64,
    pub hidden_dropout: Option<f64>,
    pub attention_dropout: Option<f64>,
    /// Store the frozen base's linear weights quantized (QLoRA); embeddings, LayerNorms, heads
    /// and adapters stay f32.
    pub quantize: Option<crate::peft::quant::QuantKind>,
    /// Store the frozen base's linear weights in bf16 (`--precision bf16`); like `quantize`,
    /// only for weights that do not train.
    pub precision: crate::peft::bf16::Precision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            num_labels: None,
            trainable: Trainable::Nothing,
            lora: None,
            pooling: Pooling::Cls,
            seed: 42,
            hidden_dropout: None,
            attention_dropout: None,
            quantize: None,
            precision: crate::peft::bf16::Precision::F32,
        }
    }
}

/// `--precision bf16` keeps the base's products in bf16 (the frozen base stored in bf16, or a
/// trained one multiplied in bf16); a quantized base is already below bf16.
fn check_precision(opts: &LoadOptions) -> Result<()> {
    use crate::peft::bf16::Precision;
    if let (Precision::Bf16, Some(kind)) = (opts.precision, opts.quantize) {
        bail!(
            "--precision {} cannot be combined with a {kind}-quantized base (QLoRA already stores \
             the frozen base below bf16)",
            opts.precision
        );
    }
    Ok(())
}

/// A classifier built from a directory, with its parameters and what loading found.
pub struct LoadedModel {
    pub model: SequenceClassifier,
    pub params: ParamStore,
    pub config: ModelConfig,
    pub report: BuildReport,
    /// Why the architecture was chosen.
    pub detection: String,
    /// Human-readable lines about what was initialised or ignored.
    pub notes: Vec<String>,
    /// The LoRA configuration applied, with default targets filled in.
    pub lora: Option<LoraConfig>,
}

/// Loads a classifier from a Hugging Face-style directory; `adapter` holds LoRA/head tensors
/// (internal names) that override the directory's.
pub fn load_classifier(
    dir: &Path,
    adapter: Option<HashMap<String, Tensor>>,
    opts: &LoadOptions,
    device: &Device,
) -> Result<LoadedModel> {
    if opts.quantize.is_some() && opts.trainable == Trainable::All {
        bail!("a quantized base cannot be fine-tuned in full: use LoRA adapters (qlora-*)");
    }
    check_precision(opts)?;
    let (weights, _format) = checkpoint::load_weights(dir, device)?;
    let names = weights
        .keys()
        .chain(adapter.iter().flat_map(|a| a.keys()))
        .map(String::as_str);
    let (mut config, detection) = ModelConfig::from_dir(dir, names)?;
    let mut weights = checkpoint::normalize_prefix(weights, config.architecture.weight_prefix())?;
    if let Some(adapter) = adapter {
        weights.extend(adapter);
    }
    if let Some(p) = opts.hidden_dropout {
        config.hidden_dropout_prob = p;
    }
    if let Some(p) = opts.attention_dropout {
        config.attention_probs_dropout_prob = p;
    }
    let classifier_weight = format!("{}.weight", head_names(config.architecture).1);
    let from_checkpoint = weights
        .get(&classifier_weight)
        .map(|t| t.dim(0))
        .transpose()?;
    let num_labels = match (from_checkpoint, opts.num_labels) {
        (Some(have), Some(want)) if have != want => bail!(
            "{}: tensor `{classifier_weight}` has {have} classes but the data has {want} labels",
            dir.display()
        ),
        (Some(have), _) => have,
        (None, Some(want)) => want,
        (None, None) => config.num_labels.unwrap_or(2),
    };
    config.num_labels = Some(num_labels);
    let lora = opts.lora.clone().map(|mut l| {
        if l.target_modules.is_empty() {
            l.target_modules = match config.architecture {
                Architecture::Dnabert2 => vec!["Wqkv".to_string()],
                Architecture::Bert | Architecture::Esm => {
                    vec!["query".into(), "key".into(), "value".into()]
                }
            };
        }
        l
    });
    let may_init: Box<dyn Fn(&str) -> bool> =
        Box::new(|n: &str| is_head(n) || n.contains(".lora_"));
    let mut builder = ParamBuilder::new(weights, opts.trainable, opts.seed, may_init, device)
        .with_lora(lora.clone())
        .with_quantize(opts.quantize)
        .with_precision(opts.precision);
    let model = SequenceClassifier::build(&mut builder, &config, num_labels, opts.pooling)
        .with_context(|| format!("loading {}", dir.display()))?;
    let (params, report) = builder
        .finish()
        .with_context(|| format!("loading {}", dir.display()))?;
    let mut notes = vec![format!(
        "architecture: {} ({detection})",
        config.architecture
    )];
    let fresh_heads: Vec<&String> = report.initialized.iter().filter(|n| is_head(n)).collect();
    if !fresh_heads.is_empty() {
        notes.push(format!(
            "the checkpoint has no trained classification head: initialised {} fresh ({} classes)",
            fresh_heads
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            num_labels
        ));
    }
    // Heads of pre-training (masked LM; ESM's contact prediction) are not the classifier's.
    let pretraining_head = |n: &str| {
        n.starts_with("cls.") || n.starts_with("lm_head.") || n.starts_with("esm.contact_head.")
    };
    let heads = report.unused.iter().filter(|n| pretraining_head(n)).count();
    if heads > 0 {
        notes.push(format!(
            "ignoring the masked-LM head and other pre-training heads ({heads} tensors: \
             `cls.*`, `lm_head.*`, `esm.contact_head.*`)"
        ));
    }
    // Saved buffers (position ids, rotary frequencies) are recomputed, not learned.
    let is_buffer = |n: &str| n.ends_with("position_ids") || n.ends_with("inv_freq");
    let other: Vec<&String> = report
        .unused
        .iter()
        .filter(|n| !pretraining_head(n) && !is_buffer(n))
        .collect();
    if !other.is_empty() {
        notes.push(format!(
            "ignoring {} unexpected tensors: {}",
            other.len(),
            other
                .iter()
                .take(8)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(LoadedModel {
        model,
        params,
        config,
        report,
        detection,
        notes,
        lora,
    })
}

/// Builds a randomly initialised encoder (with pooler and classifier) for `init-model`.
pub fn init_params(config: &ModelConfig, num_labels: usize, seed: u64) -> Result<ParamStore> {
    let mut builder = ParamBuilder::fresh(seed, &Device::Cpu);
    SequenceClassifier::build(&mut builder, config, num_labels, Pooling::Cls)?;
    Ok(builder.finish()?.0)
}

/// Writes a full model directory: `config.json`, `model.safetensors` (every non-adapter tensor)
/// and the tokenizer files.
pub fn save_model_dir(
    dir: &Path,
    config: &ModelConfig,
    params: &ParamStore,
    tokenizer: &dyn crate::tokenize::Tokenizer,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors = params.tensors(|n| !n.contains(".lora_"));
    checkpoint::save_safetensors(&dir.join("model.safetensors"), &tensors, dtype)?;
    crate::fsutil::write_json_atomic(&dir.join("config.json"), &config.to_json())?;
    tokenizer.save(dir)?;
    Ok(())
}
