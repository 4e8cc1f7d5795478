//! `dnatune inspect`: a model directory at a glance — architecture and why it was detected, the
//! modules of every layer with shapes and parameter counts, the tokenizer, and for each training
//! method the trainable share and the memory of weights, gradients and optimizer state.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use candle_core::Device;
use serde::Serialize;

use crate::model::params::{is_head, Trainable};
use crate::model::{load_classifier, LoadOptions};
use crate::peft::adapter;
use crate::peft::quant::{quantized_bytes, QuantKind};
use crate::peft::LoraConfig;
use crate::train::config::Method;

#[derive(Debug, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
}

/// One module (a linear layer, an embedding, a LayerNorm, ...) and its tensors.
#[derive(Debug, Serialize)]
pub struct ModuleInfo {
    /// Encoder layer index, `None` for embeddings and heads.
    pub layer: Option<usize>,
    pub module: String,
    pub kind: String,
    pub tensors: Vec<TensorInfo>,
    pub params: usize,
    /// Parameters its LoRA adapter adds (0 when not a target).
    pub lora_params: usize,
    /// Whether QLoRA stores its weight quantized (frozen base linear layers only).
    pub quantized_under_qlora: bool,
}

#[derive(Debug, Serialize)]
pub struct TokenizerInfo {
    pub description: String,
    pub vocab_size: usize,
    pub special_tokens: BTreeMap<String, (u32, Option<String>)>,
    /// Mean bases per (non-special) token on a sample, and how many sequences were sampled.
    pub bases_per_token: Option<f64>,
    pub sample_sequences: usize,
}

/// Parameter counts and memory of one training method (f32 weights, AdamW's two moments).
#[derive(Debug, Serialize)]
pub struct MethodInfo {
    pub method: Method,
    pub params_total: usize,
    pub params_trainable: usize,
    pub trainable_percent: f64,
    pub weight_bytes: usize,
    pub grad_bytes: usize,
    pub optimizer_bytes: usize,
    pub total_bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub model_dir: String,
    pub architecture: String,
    pub detection: String,
    /// What an ESM config selects (positions, feed-forward, token dropout); none for the others.
    pub layout: Option<String>,
    pub config: serde_json::Value,
    pub num_labels: usize,
    pub modules: Vec<ModuleInfo>,
    pub tokenizer: TokenizerInfo,
    pub lora: LoraConfig,
    pub adapter: Option<String>,
    pub methods: Vec<MethodInfo>,
    pub notes: Vec<String>,
}

fn module_of(name: &str) -> (String, &str) {
    match name.rsplit_once('.') {
        Some((m, t)) => (m.to_string(), t),
        None => (name.to_string(), ""),
    }
}

fn layer_of(module: &str) -> Option<usize> {
    let rest = module.split(".layer.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// Looks at `dir` (and `adapter_dir`, whose LoRA settings replace the defaults: r 8, alpha 16,
/// the architecture's default targets). `sample` is a labelled or unlabelled sequence file for the
/// bases-per-token figure.
pub fn inspect(
    dir: &Path,
    adapter_dir: Option<&Path>,
    sample: Option<&Path>,
) -> Result<Inspection> {
    let device = Device::Cpu;
    let (lora, tensors) = match adapter_dir {
        Some(d) => {
            let ad = adapter::load_adapter(d, &device)?;
            (ad.config, Some(ad.tensors))
        }
        None => {
            let d = crate::train::config::TrainConfig::default().lora;
            (
                LoraConfig {
                    r: d.r,
                    alpha: d.alpha,
                    dropout: d.dropout,
                    target_modules: d.target_modules,
                },
                None,
            )
        }
    };
    // Loading with NF4 marks exactly the weights QLoRA quantizes; their shapes are kept.
    let loaded = load_classifier(
        dir,
        tensors,
        &LoadOptions {
            trainable: Trainable::AdaptersAndHead,
            lora: Some(lora),
            quantize: Some(QuantKind::Nf4),
            ..LoadOptions::default()
        },
        &device,
    )?;
    let lora = loaded.lora.clone().expect("LoRA was requested");
    let params = &loaded.params;

    let mut shapes: Vec<(String, Vec<usize>, bool)> = params
        .entries
        .iter()
        .map(|(n, p)| (n.clone(), p.tensor.dims().to_vec(), false))
        .collect();
    shapes.extend(params.quantized.iter().map(|(n, q)| {
        let (r, c) = q.shape();
        (n.clone(), vec![r, c], true)
    }));
    let mut modules: BTreeMap<String, ModuleInfo> = BTreeMap::new();
    for (name, shape, quantized) in &shapes {
        let is_lora = name.contains(".lora_");
        let key = match name.split_once(".lora_") {
            Some((m, _)) => m.to_string(),
            None => module_of(name).0,
        };
        let entry = modules.entry(key.clone()).or_insert_with(|| ModuleInfo {
            layer: layer_of(&key),
            module: key.clone(),
            kind: String::new(),
            tensors: vec![],
            params: 0,
            lora_params: 0,
            quantized_under_qlora: false,
        });
        let n: usize = shape.iter().product();
        if is_lora {
            entry.lora_params += n;
        } else {
            entry.params += n;
            entry.tensors.push(TensorInfo {
                name: module_of(name).1.to_string(),
                shape: shape.clone(),
            });
        }
        entry.quantized_under_qlora |= quantized;
    }
    let mut modules: Vec<ModuleInfo> = modules.into_values().collect();
    for m in &mut modules {
        let lower = m.module.to_lowercase();
        m.kind = if m.quantized_under_qlora {
            "linear"
        } else if is_head(&format!("{}.weight", m.module)) {
            "head (linear)"
        } else if lower.contains("norm") {
            "layernorm"
        } else if lower.contains("embeddings") {
            "embedding"
        } else {
            "other"
        }
        .to_string();
    }
    // Encoder order: embeddings, layers by number, then heads.
    modules.sort_by_key(|m| {
        let rank = match (m.layer, m.kind.as_str()) {
            (None, k) if k.starts_with("head") => 2,
            (None, _) => 0,
            (Some(_), _) => 1,
        };
        (rank, m.layer, m.module.clone())
    });

    let base: usize = modules.iter().map(|m| m.params).sum();
    let lora_total: usize = modules.iter().map(|m| m.lora_params).sum();
    let heads: usize = modules
        .iter()
        .filter(|m| m.kind.starts_with("head"))
        .map(|m| m.params)
        .sum();
    let linear_shapes: Vec<(usize, usize)> = params.quantized.values().map(|q| q.shape()).collect();
    let linear_numel: usize = linear_shapes.iter().map(|(r, c)| r * c).sum();
    let methods = Method::ALL
        .iter()
        .map(|&method| {
            let (total, trainable) = if method.uses_adapters() {
                (base + lora_total, lora_total + heads)
            } else {
                (base, base)
            };
            let weight_bytes = match method.quantize() {
                None => 4 * total,
                Some(kind) => {
                    4 * (total - linear_numel)
                        + linear_shapes
                            .iter()
                            .map(|&(r, c)| quantized_bytes(kind, r, c))
                            .sum::<usize>()
                }
            };
            MethodInfo {
                method,
                params_total: total,
                params_trainable: trainable,
                trainable_percent: 100.0 * trainable as f64 / total.max(1) as f64,
                weight_bytes,
                grad_bytes: 4 * trainable,
                optimizer_bytes: 8 * trainable,
                total_bytes: weight_bytes + 12 * trainable,
            }
        })
        .collect();

    let tok = crate::tokenize::load_tokenizer(dir)?;
    let sp = tok.special_tokens();
    let special_tokens = [
        ("cls", sp.cls),
        ("sep", sp.sep),
        ("pad", sp.pad),
        ("unk", sp.unk),
        ("mask", sp.mask),
    ]
    .into_iter()
    .map(|(k, id)| (k.to_string(), (id, tok.id_to_token(id))))
    .collect();
    let (bases_per_token, sample_sequences) = match sample {
        Some(path) => {
            let ds = crate::data::read_records(
                path,
                &crate::data::ReadOptions {
                    skip_invalid: true,
                    labels: crate::data::LabelPolicy::Optional,
                    ..Default::default()
                },
            )?;
            let recs = &ds.records[..ds.records.len().min(500)];
            let (mut bases, mut toks) = (0usize, 0usize);
            for r in recs {
                bases += r.seq.len();
                toks += tok.token_spans(&r.seq).iter().flatten().count();
            }
            ((toks > 0).then(|| bases as f64 / toks as f64), recs.len())
        }
        None => (None, 0),
    };
    let mut notes = loaded.notes.clone();
    notes.push(
        "QLoRA quantizes only the frozen base's linear layers; embeddings and LayerNorms stay \
         f32, and LoRA adapters, pooler and classifier stay f32 and trainable"
            .into(),
    );
    Ok(Inspection {
        model_dir: dir.display().to_string(),
        architecture: loaded.config.architecture.to_string(),
        detection: loaded.detection.clone(),
        layout: match loaded.config.architecture {
            crate::model::config::Architecture::Esm => {
                Some(crate::model::esm::EsmOptions::from_config(&loaded.config.raw)?.to_string())
            }
            _ => None,
        },
        config: loaded.config.to_json(),
        num_labels: loaded.model.num_labels,
        modules,
        tokenizer: TokenizerInfo {
            description: tok.describe(),
            vocab_size: tok.vocab_size(),
            special_tokens,
            bases_per_token,
            sample_sequences,
        },
        lora,
        adapter: adapter_dir.map(|d| d.display().to_string()),
        methods,
        notes,
    })
}

fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The report as text. `only` restricts the method table to one method.
pub fn render(ins: &Inspection, only: Option<Method>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "model      {}", ins.model_dir);
    let _ = writeln!(s, "arch       {} ({})", ins.architecture, ins.detection);
    if let Some(layout) = &ins.layout {
        let _ = writeln!(s, "layout     {layout}");
    }
    if let Some(obj) = ins.config.as_object() {
        let cfg: Vec<String> = obj
            .iter()
            .filter(|(_, v)| v.is_number() || v.is_string() || v.is_boolean())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "config     {}", cfg.join(" "));
    }
    let _ = writeln!(s, "labels     {}", ins.num_labels);
    let t = &ins.tokenizer;
    let _ = writeln!(
        s,
        "tokenizer  {} (vocabulary {})",
        t.description, t.vocab_size
    );
    let specials: Vec<String> = t
        .special_tokens
        .iter()
        .map(|(k, (id, tok))| format!("{k}={}#{id}", tok.as_deref().unwrap_or("?")))
        .collect();
    let _ = writeln!(s, "specials   {}", specials.join(" "));
    match t.bases_per_token {
        Some(b) => {
            let _ = writeln!(
                s,
                "bases/tok  {b:.2} (on {} sample sequences)",
                t.sample_sequences
            );
        }
        None => {
            let _ = writeln!(s, "bases/tok  - (no sample data)");
        }
    }
    let _ = writeln!(
        s,
        "lora       r={} alpha={} dropout={} targets={:?}{}",
        ins.lora.r,
        ins.lora.alpha,
        ins.lora.dropout,
        ins.lora.target_modules,
        ins.adapter
            .as_ref()
            .map_or(String::new(), |a| format!(" (from {a})"))
    );
    let _ = writeln!(
        s,
        "\n{:<5} {:<48} {:<13} {:<24} {:>11} {:>8} {:>7}",
        "layer", "module", "kind", "shapes", "params", "lora", "qlora"
    );
    for m in &ins.modules {
        // The weight's shape first, then others (bias) marked by name.
        let mut shapes: Vec<String> = m
            .tensors
            .iter()
            .filter(|t| t.name == "weight")
            .map(|t| format!("{:?}", t.shape))
            .collect();
        shapes.extend(
            m.tensors
                .iter()
                .filter(|t| t.name != "weight")
                .map(|t| format!("{}{:?}", t.name, t.shape)),
        );
        let _ = writeln!(
            s,
            "{:<5} {:<48} {:<13} {:<24} {:>11} {:>8} {:>7}",
            m.layer.map_or("-".into(), |l| l.to_string()),
            m.module,
            m.kind,
            shapes.join(" "),
            m.params,
            if m.lora_params > 0 {
                m.lora_params.to_string()
            } else {
                "-".into()
            },
            if m.quantized_under_qlora {
                "quant"
            } else {
                "f32"
            }
        );
    }
    let _ = writeln!(
        s,
        "\n{:<11} {:>12} {:>12} {:>9} {:>11} {:>11} {:>11} {:>11}",
        "method", "params", "trainable", "%", "weights", "grads", "optimizer", "total"
    );
    for m in ins
        .methods
        .iter()
        .filter(|m| only.is_none_or(|o| o == m.method))
    {
        let _ = writeln!(
            s,
            "{:<11} {:>12} {:>12} {:>8.3}% {:>11} {:>11} {:>11} {:>11}",
            m.method.name(),
            m.params_total,
            m.params_trainable,
            m.trainable_percent,
            human(m.weight_bytes),
            human(m.grad_bytes),
            human(m.optimizer_bytes),
            human(m.total_bytes)
        );
    }
    let _ = writeln!(
        s,
        "(memory: weights as stored, f32 gradients and AdamW's two f32 moments of the trainable \
         parameters; activations not included)"
    );
    for n in &ins.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}
