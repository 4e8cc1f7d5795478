//! Adapters on disk in the Python PEFT layout: `adapter_config.json` plus
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` and the
//! trained heads under their own names, so `PeftModel.from_pretrained` can load them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::model::checkpoint;
use crate::model::params::ParamStore;
use crate::peft::LoraConfig;

const PREFIX: &str = "base_model.model.";

/// Writes the adapter (LoRA matrices and the trained pooler/classifier) of `params`.
pub fn save_adapter(
    dir: &Path,
    lora: &LoraConfig,
    params: &ParamStore,
    base_model: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: HashMap<String, Tensor> = params
        .trainable()
        .map(|(name, var)| (format!("{PREFIX}{name}"), var.as_tensor().clone()))
        .collect();
    checkpoint::save_safetensors(&dir.join("adapter_model.safetensors"), &tensors, DType::F32)?;
    let base = std::fs::canonicalize(base_model).unwrap_or_else(|_| base_model.to_path_buf());
    let config = json!({
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.target_modules,
        "modules_to_save": ["classifier", "pooler"],
        "base_model_name_or_path": base.to_string_lossy(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
    });
    crate::fsutil::write_json_atomic(&dir.join("adapter_config.json"), &config)
}

/// A loaded adapter: its LoRA settings, its tensors under dnatune's internal names, and the base
/// model it names.
pub struct Adapter {
    pub config: LoraConfig,
    pub tensors: HashMap<String, Tensor>,
    pub base_model: Option<String>,
}

/// Reads an adapter directory written by dnatune or by Python PEFT.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<Adapter> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read adapter config {}", cfg_path.display()))?;
    let raw: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    let field = |k: &str| {
        raw.get(k)
            .with_context(|| format!("{}: missing `{k}`", cfg_path.display()))
    };
    if let Some(kind) = raw.get("peft_type").and_then(Value::as_str) {
        if kind != "LORA" {
            bail!(
                "{}: peft_type `{kind}` is not supported (only LORA)",
                cfg_path.display()
            );
        }
    }
    let targets = match field("target_modules")? {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => bail!(
            "{}: `target_modules` must be a list of names",
            cfg_path.display()
        ),
    };
    let config = LoraConfig {
        r: field("r")?
            .as_u64()
            .with_context(|| format!("{}: `r` must be an integer", cfg_path.display()))?
            as usize,
        alpha: field("lora_alpha")?.as_f64().unwrap_or(8.0),
        dropout: raw
            .get("lora_dropout")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        target_modules: targets,
    };
    let weights_path = dir.join("adapter_model.safetensors");
    if !weights_path.exists() {
        bail!("adapter weights {} not found", weights_path.display());
    }
    let raw_tensors = candle_core::safetensors::load(&weights_path, device)
        .with_context(|| format!("cannot read {}", weights_path.display()))?;
    let mut tensors = HashMap::new();
    // Sorted, so that the first problem reported is the same on every run.
    let mut raw_tensors: Vec<(String, Tensor)> = raw_tensors.into_iter().collect();
    raw_tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, t) in raw_tensors {
        crate::model::checkpoint::check_finite(&t, &key, &weights_path)?;
        let name = key
            .strip_prefix(PREFIX)
            .unwrap_or(&key)
            .replace(".modules_to_save.default.", ".")
            .replace(".default.", ".");
        if name.ends_with(".lora_A.weight") && t.dim(0)? != config.r {
            bail!(
                "{}: tensor `{key}` has rank {} but adapter_config.json says r = {}",
                weights_path.display(),
                t.dim(0)?,
                config.r
            );
        }
        if name.ends_with(".lora_B.weight") && t.dim(1)? != config.r {
            bail!(
                "{}: tensor `{key}` has rank {} but adapter_config.json says r = {}",
                weights_path.display(),
                t.dim(1)?,
                config.r
            );
        }
        tensors.insert(name, t.to_dtype(DType::F32)?);
    }
    let base_model = raw
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(String::from);
    Ok(Adapter {
        config,
        tensors,
        base_model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Architecture, ModelConfig};
    use crate::model::params::{ParamBuilder, Trainable};
    use crate::model::{Pooling, SequenceClassifier};

    fn adapted_params(r: usize) -> ParamStore {
        let cfg = ModelConfig::new(Architecture::Dnabert2, 16, 2, 8, 2, 12).unwrap();
        let lora = LoraConfig {
            r,
            alpha: 16.0,
            dropout: 0.1,
            target_modules: vec!["Wqkv".into()],
        };
        let mut b = ParamBuilder::new(
            HashMap::new(),
            Trainable::AdaptersAndHead,
            5,
            Box::new(|_| true),
            &Device::Cpu,
        )
        .with_lora(Some(lora));
        SequenceClassifier::build(&mut b, &cfg, 2, Pooling::Cls).unwrap();
        b.finish().unwrap().0
    }

    #[test]
    fn peft_layout_round_trips_exactly() {
        let params = adapted_params(4);
        let lora = LoraConfig {
            r: 4,
            alpha: 16.0,
            dropout: 0.1,
            target_modules: vec!["Wqkv".into()],
        };
        let dir = tempfile::tempdir().unwrap();
        save_adapter(dir.path(), &lora, &params, Path::new("/models/base")).unwrap();
        let raw = candle_core::safetensors::load(
            dir.path().join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let mut keys: Vec<&String> = raw.keys().collect();
        keys.sort();
        let expected = [
            "base_model.model.bert.encoder.layer.0.attention.self.Wqkv.lora_A.weight",
            "base_model.model.bert.encoder.layer.0.attention.self.Wqkv.lora_B.weight",
            "base_model.model.bert.encoder.layer.1.attention.self.Wqkv.lora_A.weight",
            "base_model.model.bert.encoder.layer.1.attention.self.Wqkv.lora_B.weight",
            "base_model.model.bert.pooler.dense.bias",
            "base_model.model.bert.pooler.dense.weight",
            "base_model.model.classifier.bias",
            "base_model.model.classifier.weight",
        ];
        assert_eq!(keys, expected);
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["task_type"], "SEQ_CLS");
        assert_eq!(cfg["r"], 4);
        assert_eq!(cfg["bias"], "none");
        let back = load_adapter(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(back.config, lora);
        for (name, var) in params.trainable() {
            let a: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = back.tensors[name].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{name}");
        }
    }

    #[test]
    fn bad_adapter_directories_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_adapter(dir.path(), &Device::Cpu).err().unwrap();
        assert!(format!("{err:#}").contains("adapter_config.json"));
        let lora = LoraConfig {
            r: 4,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["Wqkv".into()],
        };
        save_adapter(dir.path(), &lora, &adapted_params(4), Path::new("base")).unwrap();
        let cfg_path = dir.path().join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .unwrap()
            .replace("\"r\": 4", "\"r\": 8");
        std::fs::write(&cfg_path, &text).unwrap();
        let err = format!(
            "{:#}",
            load_adapter(dir.path(), &Device::Cpu).err().unwrap()
        );
        assert!(err.contains("lora_A") && err.contains("r = 8"), "{err}");
        // Weights with a NaN in them (saved after training diverged) are refused by name.
        std::fs::write(&cfg_path, text.replace("\"r\": 8", "\"r\": 4")).unwrap();
        let weights = dir.path().join("adapter_model.safetensors");
        let mut raw = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        let key = "base_model.model.classifier.bias";
        let poisoned = Tensor::new(&[0.5f32, f32::NAN], &Device::Cpu).unwrap();
        raw.insert(key.to_string(), poisoned);
        candle_core::safetensors::save(&raw, &weights).unwrap();
        let err = format!(
            "{:#}",
            load_adapter(dir.path(), &Device::Cpu).err().unwrap()
        );
        assert!(
            err.contains(key) && err.contains("1 NaN or infinite values of 2"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("adapter_model.safetensors")).unwrap();
        let err = format!(
            "{:#}",
            load_adapter(dir.path(), &Device::Cpu).err().unwrap()
        );
        assert!(err.contains("adapter_model.safetensors"), "{err}");
    }
}
