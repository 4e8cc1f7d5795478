//! The training configuration: a TOML file whose every field has a default, overridden by
//! command-line flags, and written back resolved into the run directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::Pooling;

/// Which parameters fine-tuning updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every weight.
    Full,
    /// Low-rank adapters on a frozen base, plus pooler and classifier.
    Lora,
    /// LoRA on a base whose linear weights are stored as int8 (per-row absmax).
    #[serde(rename = "qlora-int8")]
    #[value(name = "qlora-int8")]
    QloraInt8,
    /// LoRA on a base whose linear weights are stored as NF4 with double quantization.
    #[serde(rename = "qlora-nf4")]
    #[value(name = "qlora-nf4")]
    QloraNf4,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::Full,
        Method::Lora,
        Method::QloraInt8,
        Method::QloraNf4,
    ];

    /// Whether the run trains adapters (and the head) on a frozen base.
    pub fn uses_adapters(self) -> bool {
        self != Method::Full
    }

    /// How the frozen base is stored.
    pub fn quantize(self) -> Option<crate::peft::quant::QuantKind> {
        use crate::peft::quant::QuantKind;
        match self {
            Method::Full | Method::Lora => None,
            Method::QloraInt8 => Some(QuantKind::Int8),
            Method::QloraNf4 => Some(QuantKind::Nf4),
        }
    }

    /// The command-line / config name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora => "lora",
            Method::QloraInt8 => "qlora-int8",
            Method::QloraNf4 => "qlora-nf4",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Warm-up, then linear decay to zero.
    Linear,
    /// Warm-up, then half a cosine down to zero.
    Cosine,
    /// Warm-up, then constant.
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SplitKind {
    /// Seeded shuffle, then cut by the fractions.
    Random,
    /// Seeded shuffle within each class: every split keeps the class proportions.
    Stratified,
    /// Whole chromosomes held out (ids like chr3:100-200, or BED regions).
    Chromosome,
    /// Sequences sharing a k-mer (31 unless --split-kmer) on either strand kept in one split.
    Similarity,
}

/// How the training loss weighs the classes (as `torch.nn.CrossEntropyLoss(weight=...)`: each
/// sequence's loss times its class's weight, divided by the batch's sum of those weights).
#[derive(Clone, Debug, PartialEq)]
pub enum ClassWeights {
    /// Inverse class frequency on the training split, `n / (classes * n_class)` (scikit-learn's
    /// "balanced"), so every class carries the same total weight.
    Balanced,
    /// One positive weight per class, in class order.
    Given(Vec<f64>),
}

impl std::str::FromStr for ClassWeights {
    type Err = String;

    /// `balanced`, or comma-separated weights such as `1,4.5`.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        if text.trim() == "balanced" {
            return Ok(ClassWeights::Balanced);
        }
        let weights = text
            .split(',')
            .map(|w| {
                w.trim().parse::<f64>().map_err(|_| {
                    format!(
                        "class weights must be `balanced` or numbers such as `1,4.5`, got `{text}`"
                    )
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        ClassWeights::Given(weights).checked()
    }
}

impl ClassWeights {
    fn checked(self) -> std::result::Result<Self, String> {
        if let ClassWeights::Given(w) = &self {
            if w.is_empty() || w.iter().any(|&x| !(x.is_finite() && x > 0.0)) {
                return Err(format!("class weights must be positive numbers, got {w:?}"));
            }
        }
        Ok(self)
    }
}

/// TOML: `class_weights = "balanced"` or `class_weights = [1.0, 4.5]`.
impl Serialize for ClassWeights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ClassWeights::Balanced => s.serialize_str("balanced"),
            ClassWeights::Given(w) => w.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ClassWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            List(Vec<f64>),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("class_weights must be \"balanced\" or a list of numbers")
        })?;
        match raw {
            Raw::Text(t) => t.parse(),
            Raw::List(w) => ClassWeights::Given(w).checked(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// How a single input file is split (a GUE directory is used as it is).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitSettings {
    pub strategy: SplitKind,
    pub dev_fraction: f64,
    pub test_fraction: f64,
    pub dev_chroms: Vec<String>,
    pub test_chroms: Vec<String>,
    /// The similarity strategy's link: sequences sharing a k-mer this long (8 to 32) on either
    /// strand. Training also reports how many dev and test sequences share one with training.
    pub kmer: usize,
    /// k-fold cross-validation (0: off): one run per fold, each testing on its fold and picking
    /// its checkpoint on `dev_fraction` of the rest; `test_fraction` is then unused.
    pub folds: usize,
    /// The fold (1-based) a single run of a cross-validation tests on; set per run by
    /// [`crate::train::run_folds`].
    pub fold: usize,
}

impl Default for SplitSettings {
    fn default() -> Self {
        SplitSettings {
            strategy: SplitKind::Stratified,
            dev_fraction: 0.1,
            test_fraction: 0.1,
            dev_chroms: vec![],
            test_chroms: vec![],
            kmer: 31,
            folds: 0,
            fold: 0,
        }
    }
}

/// LoRA settings; an empty `target_modules` means the architecture's default (`Wqkv` for
/// DNABERT-2, `query,key,value` for BERT).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        LoraSettings {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec![],
        }
    }
}

/// Everything a training run needs. Field names are the TOML keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model directory (config.json, tokenizer, weights).
    pub model: PathBuf,
    /// A GUE directory (train/dev/test) or one file to split.
    pub data: PathBuf,
    /// Run directory.
    pub out: PathBuf,
    /// An adapter directory to start from (PEFT layout).
    pub adapter: Option<PathBuf>,
    pub method: Method,
    /// `bf16` stores the frozen base's linear weights in bf16 (LoRA only; adapters, heads and
    /// optimizer state stay f32).
    pub precision: crate::peft::bf16::Precision,
    pub seed: u64,
    pub epochs: usize,
    /// Stop after this many optimiser steps (0: no cap).
    pub max_steps: usize,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub grad_accum: usize,
    /// Peak learning rate; default 3e-5 for full fine-tuning, 5e-4 for LoRA.
    pub lr: Option<f64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Warm-up length as a fraction of all steps (ignored when `warmup_steps` is set).
    pub warmup_ratio: f64,
    pub warmup_steps: Option<usize>,
    pub scheduler: Scheduler,
    /// Gradient-norm clipping (0: none).
    pub max_grad_norm: f64,
    /// Token budget per sequence including [CLS] and [SEP].
    pub max_length: usize,
    /// Evaluate on dev every N steps as well as after each epoch (0: only after each epoch).
    pub eval_every: usize,
    pub log_every: usize,
    /// Metric that picks the best checkpoint and drives early stopping.
    pub metric: String,
    /// Evaluations without improvement before stopping (0: never stop early).
    pub patience: usize,
    pub pooling: Pooling,
    pub hidden_dropout: Option<f64>,
    pub attention_dropout: Option<f64>,
    /// Add the reverse complement of every training sequence.
    pub reverse_complement: bool,
    /// Score dev and test sequences on both strands (each sequence and its reverse complement)
    /// and average the class probabilities.
    pub average_strands: bool,
    /// Weigh the training loss by class (none: every sequence counts the same).
    pub class_weights: Option<ClassWeights>,
    pub bucket_by_length: bool,
    /// Train on a seeded random subset of this many training sequences.
    pub max_train_samples: Option<usize>,
    pub sequence_column: String,
    pub label_column: String,
    /// Skip (and count) sequences with letters other than ACGTN instead of failing.
    pub skip_invalid: bool,
    /// Read IUPAC ambiguity codes (R, Y, K, ...) as N instead of failing on them.
    pub ambiguous_as_n: bool,
    pub split: SplitSettings,
    pub lora: LoraSettings,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: PathBuf::new(),
            data: PathBuf::new(),
            out: PathBuf::from("runs/latest"),
            adapter: None,
            method: Method::Lora,
            precision: crate::peft::bf16::Precision::F32,
            seed: 42,
            epochs: 3,
            max_steps: 0,
            batch_size: 32,
            eval_batch_size: 128,
            grad_accum: 1,
            lr: None,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_ratio: 0.05,
            warmup_steps: None,
            scheduler: Scheduler::Linear,
            max_grad_norm: 1.0,
            max_length: 128,
            eval_every: 0,
            log_every: 10,
            metric: "mcc".into(),
            patience: 3,
            pooling: Pooling::Cls,
            hidden_dropout: None,
            attention_dropout: None,
            reverse_complement: false,
            average_strands: false,
            class_weights: None,
            bucket_by_length: true,
            max_train_samples: None,
            sequence_column: "sequence".into(),
            label_column: "label".into(),
            skip_invalid: false,
            ambiguous_as_n: false,
            split: SplitSettings::default(),
            lora: LoraSettings::default(),
            device: "cpu".into(),
        }
    }
}

impl TrainConfig {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    pub fn learning_rate(&self) -> f64 {
        self.lr.unwrap_or(if self.method.uses_adapters() {
            5e-4
        } else {
            3e-5
        })
    }

    /// Checks ranges so a typo fails before any work is done.
    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            bail!("no model directory given (--model or `model = ...` in the config)");
        }
        if self.data.as_os_str().is_empty() {
            bail!("no data given (--data or `data = ...` in the config)");
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.eval_batch_size == 0 {
            bail!("batch_size, eval_batch_size and grad_accum must be positive");
        }
        if self.epochs == 0 && self.max_steps == 0 {
            bail!("epochs and max_steps are both 0: nothing to train");
        }
        if self.max_length < 3 {
            bail!("max_length must be at least 3 ([CLS], one token, [SEP])");
        }
        crate::train::optim::OptimiserSettings {
            lr: self.learning_rate(),
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            max_grad_norm: self.max_grad_norm,
        }
        .validate()?;
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("warmup_ratio must be in [0, 1)");
        }
        if !crate::eval::Metrics::NAMES.contains(&self.metric.as_str()) {
            bail!(
                "unknown metric `{}`; choose one of {:?}",
                self.metric,
                crate::eval::Metrics::NAMES
            );
        }
        if self.precision == crate::peft::bf16::Precision::Bf16 && self.method.quantize().is_some()
        {
            bail!(
                "precision bf16 keeps the base's products in bf16; method {} already stores the \
                 frozen base quantized, below bf16",
                self.method.name()
            );
        }
        use crate::data::similarity::{MAX_KMER, MIN_KMER};
        let kmers = MIN_KMER..=MAX_KMER;
        if !kmers.contains(&self.split.kmer) {
            bail!(
                "split.kmer (--split-kmer) must be {} to {}, got {}",
                kmers.start(),
                kmers.end(),
                self.split.kmer
            );
        }
        let (folds, fold) = (self.split.folds, self.split.fold);
        if folds == 1 {
            bail!("cross-validation needs at least 2 folds (split.folds = 0 turns it off)");
        }
        if fold == 0 && folds > 0 {
            bail!(
                "split.folds = {folds} asks for cross-validation, which runs once per fold \
                 (`dnatune train --folds {folds}`); it does not combine with --seeds"
            );
        }
        if fold > folds {
            bail!("split.fold {fold} is not one of the split.folds = {folds} folds (1..={folds})");
        }
        if self.method.uses_adapters() && self.lora.r == 0 {
            bail!("LoRA rank r must be positive");
        }
        if self.method.uses_adapters() && !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
            bail!(
                "LoRA alpha must be a positive number, got {}",
                self.lora.alpha
            );
        }
        for (name, p) in [
            ("lora.dropout", Some(self.lora.dropout)),
            ("hidden_dropout", self.hidden_dropout),
            ("attention_dropout", self.attention_dropout),
        ] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    bail!("{name} must be in [0, 1), got {p}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_round_trips() {
        let cfg: TrainConfig = toml::from_str(
            "model = \"m\"\ndata = \"d\"\nmethod = \"full\"\nepochs = 5\n[lora]\nr = 4\n",
        )
        .unwrap();
        assert_eq!(cfg.method, Method::Full);
        assert_eq!(cfg.epochs, 5);
        assert_eq!(cfg.lora.r, 4);
        assert_eq!(cfg.lora.alpha, 16.0);
        assert_eq!(cfg.learning_rate(), 3e-5);
        let back: TrainConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn qlora_method_names_are_hyphenated_everywhere() {
        use clap::ValueEnum;
        for m in Method::ALL {
            let toml_text = format!("method = \"{}\"\n", m.name());
            assert_eq!(toml::from_str::<TrainConfig>(&toml_text).unwrap().method, m);
            assert_eq!(Method::from_str(m.name(), false).unwrap(), m);
            let cfg = TrainConfig {
                method: m,
                ..Default::default()
            };
            assert!(cfg.to_toml().unwrap().contains(&toml_text));
        }
        assert_eq!(Method::QloraNf4.name(), "qlora-nf4");
        assert!(Method::QloraInt8.uses_adapters() && !Method::Full.uses_adapters());
        assert_eq!(
            TrainConfig {
                method: Method::QloraNf4,
                ..Default::default()
            }
            .learning_rate(),
            5e-4
        );
    }

    #[test]
    fn class_weights_read_from_toml_and_flags_and_round_trip() {
        for (toml_text, want) in [
            ("class_weights = \"balanced\"\n", ClassWeights::Balanced),
            (
                "class_weights = [1.0, 4.5]\n",
                ClassWeights::Given(vec![1.0, 4.5]),
            ),
        ] {
            let cfg: TrainConfig = toml::from_str(toml_text).unwrap();
            assert_eq!(cfg.class_weights.as_ref(), Some(&want));
            let back: TrainConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
            assert_eq!(back, cfg);
        }
        assert_eq!("1,4.5".parse(), Ok(ClassWeights::Given(vec![1.0, 4.5])));
        assert_eq!("balanced".parse(), Ok(ClassWeights::Balanced));
        assert!(!TrainConfig::default()
            .to_toml()
            .unwrap()
            .contains("class_weights"));
        for bad in ["class_weights = \"even\"\n", "class_weights = [1.0, 0.0]\n"] {
            let err = toml::from_str::<TrainConfig>(bad).unwrap_err().to_string();
            assert!(
                err.contains("class_weights") || err.contains("class weights"),
                "{err}"
            );
        }
        for bad in ["1,-2", "1,x", "", "nan,1"] {
            assert!(bad.parse::<ClassWeights>().is_err(), "`{bad}` accepted");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(toml::from_str::<TrainConfig>("epoch = 3\n").is_err());
        let mut cfg = TrainConfig {
            model: "m".into(),
            data: "d".into(),
            ..Default::default()
        };
        cfg.validate().unwrap();
        cfg.metric = "auc".into();
        assert!(cfg.validate().is_err());
        cfg.metric = "mcc".into();
        // Cross-validation: a fold run names one of at least 2 folds; the parent runs per fold.
        for (folds, fold, needle) in [
            (1, 0, "at least 2 folds"),
            (5, 0, "once per fold"),
            (5, 6, "not one of"),
            (0, 2, "not one of"),
        ] {
            cfg.split.folds = folds;
            cfg.split.fold = fold;
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "folds {folds}, fold {fold}: {err}");
        }
        cfg.split.fold = 5;
        cfg.split.folds = 5;
        cfg.validate().unwrap();
    }
}
