//! Folding a LoRA adapter into its full-precision base (`W + (alpha / r) B A`), as PEFT's
//! `merge_and_unload` does after (Q)LoRA training, so the result is a plain model directory that
//! needs no adapter support to run.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::model::params::Trainable;
use crate::model::{self, LoadOptions, LoadedModel};
use crate::ops::ForwardCtx;
use crate::peft::adapter;

/// What a merge did.
#[derive(Debug)]
pub struct MergeSummary {
    /// Modules whose weight received the low-rank update.
    pub merged_modules: Vec<String>,
    /// Largest |merged - unmerged| logit on a few random sequences (a self-check).
    pub max_logit_diff: f32,
    pub num_labels: usize,
}

/// The tensors of an adapted model with every LoRA pair folded into its base weight: each
/// `<m>.lora_A.weight` / `<m>.lora_B.weight` pair is removed and `<m>.weight` becomes
/// `W + scaling * B A`. Returns the tensors and the merged module names.
pub fn fold_lora(
    tensors: &HashMap<String, Tensor>,
    scaling: f64,
) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
    let mut out: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(n, _)| !n.contains(".lora_"))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let mut modules: Vec<String> = tensors
        .keys()
        .filter_map(|n| n.strip_suffix(".lora_A.weight").map(String::from))
        .collect();
    modules.sort();
    for m in &modules {
        let a = &tensors[&format!("{m}.lora_A.weight")];
        let b = tensors
            .get(&format!("{m}.lora_B.weight"))
            .with_context(|| format!("adapter has `{m}.lora_A.weight` but no lora_B"))?;
        let w_name = format!("{m}.weight");
        let w = out
            .get(&w_name)
            .with_context(|| format!("the base model has no `{w_name}` to merge into"))?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scaling)?;
        let merged = (w.to_dtype(DType::F32)? + delta)
            .with_context(|| format!("adapter shapes do not fit `{w_name}`"))?;
        out.insert(w_name, merged);
    }
    Ok((out, modules))
}

/// Merges the adapter in `adapter_dir` into the model in `base_dir` and writes a plain model
/// directory (config, tokenizer, `model.safetensors` with the adapter's pooler and classifier).
pub fn merge_adapter(base_dir: &Path, adapter_dir: &Path, out_dir: &Path) -> Result<MergeSummary> {
    let device = Device::Cpu;
    let ad = adapter::load_adapter(adapter_dir, &device)?;
    let scaling = ad.config.scaling();
    let record = model::record::read_record(adapter_dir)?;
    let pooling = record.map(|r| r.pooling).unwrap_or_default();
    // Building the adapted model first checks ranks, shapes and target names with the loader's
    // messages, and gives the reference logits.
    let unmerged = model::load_classifier(
        base_dir,
        Some(ad.tensors),
        &LoadOptions {
            trainable: Trainable::Nothing,
            lora: Some(ad.config.clone()),
            pooling,
            ..LoadOptions::default()
        },
        &device,
    )
    .with_context(|| format!("applying adapter {}", adapter_dir.display()))?;
    let tensors = unmerged.params.tensors(|_| true);
    let (folded, merged_modules) = fold_lora(&tensors, scaling)?;
    drop(tensors);
    let merged = model::load_classifier(
        base_dir,
        Some(folded),
        &LoadOptions {
            trainable: Trainable::Nothing,
            pooling,
            ..LoadOptions::default()
        },
        &device,
    )?;
    let max_logit_diff = compare_logits(&unmerged, &merged, &device)?;
    let tokenizer = crate::tokenize::load_tokenizer(base_dir)?;
    model::save_model_dir(
        out_dir,
        &merged.config,
        &merged.params,
        tokenizer.as_ref(),
        DType::F32,
    )?;
    if let Some(record) = record {
        // The merged weights are plain f32: the adapter's base precision no longer applies.
        let merged_record = model::record::CheckpointRecord {
            quantize: None,
            precision: crate::peft::bf16::Precision::F32,
            ..record
        };
        model::record::write_record(out_dir, &merged_record)?;
    }
    Ok(MergeSummary {
        merged_modules,
        max_logit_diff,
        num_labels: merged.model.num_labels,
    })
}

/// Largest logit difference of two models on 4 random sequences of 24 tokens.
pub fn compare_logits(a: &LoadedModel, b: &LoadedModel, device: &Device) -> Result<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let vocab = a.config.vocab_size as u32;
    let ids: Vec<u32> = (0..4 * 24)
        .map(|_| rng.random_range(5.min(vocab - 1)..vocab))
        .collect();
    let ids = Tensor::from_vec(ids, (4, 24), device)?;
    let mask = Tensor::ones((4, 24), DType::U32, device)?;
    let ctx = ForwardCtx::eval();
    let la = a.model.forward(&ids, &mask, &ctx)?;
    let lb = b.model.forward(&ids, &mask, &ctx)?;
    Ok((la - lb)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}
