//! TEMPORARY minimal stand-in (replaced by the full checkpoint module on merge).
use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

pub enum WeightFormat {
    Safetensors,
}

pub fn load_weights(dir: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, WeightFormat)> {
    let m = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
    let m = m.into_iter().map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap())).collect();
    Ok((m, WeightFormat::Safetensors))
}

pub fn normalize_prefix(map: HashMap<String, Tensor>, _prefix: &str) -> HashMap<String, Tensor> {
    map
}

pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>, dtype: DType) -> Result<()> {
    let t: HashMap<String, Tensor> =
        tensors.iter().map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap())).collect();
    candle_core::safetensors::save(&t, path)?;
    Ok(())
}
