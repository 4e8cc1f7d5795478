//! The parameter store: every tensor of a model under its Hugging Face name, frozen (plain tensor)
//! or trainable (`Var`), built from loaded weights with shape checks and seeded initialisation of
//! whatever the checkpoint lacks and may lack (a fresh pooler and classifier, LoRA adapters).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

use crate::ops::Initializer;
use crate::peft::bf16::{Bf16Weight, Precision};
use crate::peft::quant::{QuantKind, QuantizedWeight};
use crate::peft::LoraConfig;

/// One named parameter. `var` is set when the optimiser updates it; `tensor` shares its storage.
#[derive(Clone)]
pub struct Param {
    pub tensor: Tensor,
    pub var: Option<Var>,
}

/// All parameters of a model, ordered by name.
#[derive(Clone, Default)]
pub struct ParamStore {
    pub entries: BTreeMap<String, Param>,
    /// Frozen linear weights held quantized (QLoRA); absent from `entries`.
    pub quantized: BTreeMap<String, Arc<QuantizedWeight>>,
    /// Frozen linear weights held in bf16 (`--precision bf16`); absent from `entries`.
    pub bf16: BTreeMap<String, Arc<Bf16Weight>>,
}

impl ParamStore {
    pub fn trainable(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.entries
            .iter()
            .filter_map(|(n, p)| p.var.as_ref().map(|v| (n, v)))
    }

    pub fn num_params(&self) -> usize {
        self.entries
            .values()
            .map(|p| p.tensor.elem_count())
            .sum::<usize>()
            + self.quantized.values().map(|q| q.numel()).sum::<usize>()
            + self.bf16.values().map(|w| w.numel()).sum::<usize>()
    }

    /// Bytes the weights occupy: f32/f64 tensors at their size, quantized and bf16 ones as
    /// stored (a bf16 weight's input-gradient packing counts once a backward pass built it).
    pub fn weight_bytes(&self) -> usize {
        self.entries
            .values()
            .map(|p| p.tensor.elem_count() * p.tensor.dtype().size_in_bytes())
            .sum::<usize>()
            + self
                .quantized
                .values()
                .map(|q| q.storage_bytes())
                .sum::<usize>()
            + self.bf16.values().map(|w| w.storage_bytes()).sum::<usize>()
    }

    /// The gradient of every trainable tensor that `store` holds, by parameter name.
    pub fn gradients(&self, store: &candle_core::backprop::GradStore) -> HashMap<String, Tensor> {
        self.trainable()
            .filter_map(|(n, v)| store.get(v).map(|g| (n.clone(), g.clone())))
            .collect()
    }

    pub fn num_trainable(&self) -> usize {
        self.trainable().map(|(_, v)| v.elem_count()).sum()
    }

    /// Tensors whose name satisfies `keep`, for saving.
    pub fn tensors(&self, keep: impl Fn(&str) -> bool) -> HashMap<String, Tensor> {
        self.entries
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(n, p)| (n.clone(), p.tensor.clone()))
            .collect()
    }
}

/// How a parameter starts when the checkpoint does not provide it.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f64),
    Uniform(f64),
    Zeros,
    Ones,
}

/// Which parameters the optimiser updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trainable {
    /// Full fine-tuning (and pre-training): everything.
    All,
    /// Adapter training: LoRA matrices, pooler and classifier only.
    AdaptersAndHead,
    /// Inference.
    Nothing,
}

/// What building a model from a checkpoint found.
#[derive(Debug, Default)]
pub struct BuildReport {
    /// Parameters the checkpoint lacked and that were freshly initialised.
    pub initialized: Vec<String>,
    /// Checkpoint tensors the model has no use for.
    pub unused: Vec<String>,
}

/// Builds a [`ParamStore`] while the model asks for its tensors by name.
pub struct ParamBuilder {
    loaded: HashMap<String, Tensor>,
    used: HashSet<String>,
    store: ParamStore,
    trainable: Trainable,
    init: Initializer,
    /// Names that may be initialised when absent from `loaded` (all of them for a fresh model).
    may_init: Box<dyn Fn(&str) -> bool>,
    pub(crate) lora: Option<LoraConfig>,
    pub(crate) lora_matched: HashSet<String>,
    quantize: Option<QuantKind>,
    precision: Precision,
    initialized: Vec<String>,
    problems: Vec<String>,
    device: Device,
    dtype: DType,
}

/// Heads that a classification model may build fresh on top of a pre-trained encoder.
pub fn is_head(name: &str) -> bool {
    name.starts_with("bert.pooler.") || name.starts_with("classifier.")
}

impl ParamBuilder {
    pub fn new(
        loaded: HashMap<String, Tensor>,
        trainable: Trainable,
        seed: u64,
        may_init: Box<dyn Fn(&str) -> bool>,
        device: &Device,
    ) -> Self {
        ParamBuilder {
            loaded,
            used: HashSet::new(),
            store: ParamStore::default(),
            trainable,
            init: Initializer::new(seed),
            may_init,
            lora: None,
            lora_matched: HashSet::new(),
            quantize: None,
            precision: Precision::F32,
            initialized: Vec::new(),
            problems: Vec::new(),
            device: device.clone(),
            dtype: DType::F32,
        }
    }

    /// A builder for a randomly initialised model.
    pub fn fresh(seed: u64, device: &Device) -> Self {
        Self::new(
            HashMap::new(),
            Trainable::All,
            seed,
            Box::new(|_| true),
            device,
        )
    }

    pub fn with_lora(mut self, lora: Option<LoraConfig>) -> Self {
        self.lora = lora;
        self
    }

    /// Stores every frozen base linear weight quantized as `kind` (QLoRA). Heads, adapters,
    /// embeddings and LayerNorms stay f32; only [`crate::peft::Linear`] asks for quantization.
    pub fn with_quantize(mut self, kind: Option<QuantKind>) -> Self {
        self.quantize = kind;
        self
    }

    /// The quantization a linear weight `name` gets: none when trainable or a head.
    pub fn quantize_for(&self, name: &str) -> Option<QuantKind> {
        self.quantize
            .filter(|_| !self.is_trainable(name) && !is_head(name) && !name.contains(".lora_"))
    }

    /// Like [`Self::get`], then quantizes the tensor and keeps only the quantized copy.
    pub fn get_quantized(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        kind: QuantKind,
    ) -> Result<Arc<QuantizedWeight>> {
        let dense = self.take_for_conversion(name, shape, init)?;
        let q = Arc::new(QuantizedWeight::quantize(&dense, kind)?);
        self.store.quantized.insert(name.to_string(), q.clone());
        Ok(q)
    }

    /// Stores every frozen base linear weight in bf16 when `precision` says so. As with
    /// quantization, heads, adapters, embeddings and LayerNorms stay f32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Whether `--precision bf16` covers the linear weight `name`: a base weight, not a head
    /// (small, f32 throughout) nor an adapter.
    fn bf16_base_linear(&self, name: &str) -> bool {
        self.precision == Precision::Bf16 && !is_head(name) && !name.contains(".lora_")
    }

    /// Whether the linear weight `name` is held in bf16: a frozen [`Self::bf16_base_linear`].
    pub fn bf16_for(&self, name: &str) -> bool {
        self.bf16_base_linear(name) && !self.is_trainable(name)
    }

    /// Whether the linear weight `name` trains in f32 with its products in bf16 (full
    /// fine-tuning under `--precision bf16`): a trained [`Self::bf16_base_linear`].
    pub fn bf16_products_for(&self, name: &str) -> bool {
        self.bf16_base_linear(name) && self.is_trainable(name)
    }

    /// Like [`Self::get`], then rounds the tensor to bf16 and keeps only the bf16 copy.
    pub fn get_bf16(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Arc<Bf16Weight>> {
        let dense = self.take_for_conversion(name, shape, init)?;
        let w = Arc::new(Bf16Weight::new(&dense)?);
        self.store.bf16.insert(name.to_string(), w.clone());
        Ok(w)
    }

    /// The f32 tensor `name` for a caller that stores it converted (quantized or bf16): neither
    /// the store nor the loaded checkpoint keeps it, so its memory is free again once converted
    /// and the next conversions reuse it instead of adding to the peak.
    fn take_for_conversion(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let dense = self.get(name, shape, init)?;
        self.store.entries.remove(name);
        self.loaded.remove(name);
        Ok(dense)
    }

    /// Parameter precision (F32 by default; F64 for gradient checks).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    fn is_trainable(&self, name: &str) -> bool {
        match self.trainable {
            Trainable::All => true,
            Trainable::AdaptersAndHead => is_head(name) || name.contains(".lora_"),
            Trainable::Nothing => false,
        }
    }

    /// The tensor `name` of `shape`: from the checkpoint when present (shape-checked), else
    /// initialised if allowed; problems are collected and reported together by [`Self::finish`].
    pub fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let tensor = match self.loaded.get(name) {
            Some(t) if t.dims() == shape => {
                self.used.insert(name.to_string());
                t.to_dtype(self.dtype)?.to_device(&self.device)?
            }
            Some(t) => {
                self.used.insert(name.to_string());
                self.problems.push(format!(
                    "tensor `{name}` has shape {:?} in the checkpoint but the model expects {shape:?}",
                    t.dims()
                ));
                Tensor::zeros(shape, self.dtype, &self.device)?
            }
            None => {
                if !(self.may_init)(name) {
                    self.problems
                        .push(format!("tensor `{name}` {shape:?} is missing"));
                } else {
                    self.initialized.push(name.to_string());
                }
                let values = match init {
                    Init::Normal(std) => self.init.normal(n, std),
                    Init::Uniform(bound) => self.init.uniform(n, bound),
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                };
                Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?
            }
        };
        let param = if self.is_trainable(name) {
            let var = Var::from_tensor(&tensor)?;
            Param {
                tensor: var.as_tensor().clone(),
                var: Some(var),
            }
        } else {
            Param { tensor, var: None }
        };
        let out = param.tensor.clone();
        self.store.entries.insert(name.to_string(), param);
        Ok(out)
    }

    /// Ends the build: fails naming every missing or mis-shaped tensor and every LoRA target that
    /// matched no module.
    pub fn finish(mut self) -> Result<(ParamStore, BuildReport)> {
        if let Some(lora) = &self.lora {
            for target in &lora.target_modules {
                if !self.lora_matched.contains(target) {
                    self.problems.push(format!(
                        "LoRA target module `{target}` matches no linear layer of this model"
                    ));
                }
            }
        }
        if !self.problems.is_empty() {
            bail!(
                "the weights do not fit the model:\n  {}",
                self.problems.join("\n  ")
            );
        }
        let mut unused: Vec<String> = self
            .loaded
            .keys()
            .filter(|k| !self.used.contains(*k))
            .cloned()
            .collect();
        unused.sort();
        self.initialized.sort();
        Ok((
            self.store,
            BuildReport {
                initialized: self.initialized,
                unused,
            },
        ))
    }
}
