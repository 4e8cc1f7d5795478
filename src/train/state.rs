//! Checkpoints for `--resume`: trainable tensors, optimiser moments and the loop position, written
//! to a fresh directory that replaces the previous checkpoint in one rename.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::eval::{LogEntry, Metrics};
use crate::model::checkpoint::save_safetensors;
use crate::model::params::ParamStore;
use crate::train::optim::AdamW;

/// Where the loop is and what it has seen.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunState {
    pub step: usize,
    pub epoch: usize,
    /// Micro-batches of the current epoch's plan already consumed.
    pub micro_in_epoch: usize,
    pub best_value: Option<f64>,
    pub best_step: usize,
    pub best_metrics: Option<Metrics>,
    pub evals_since_best: usize,
    /// Training is over (step budget reached or stopped early); resuming only re-tests.
    pub finished: bool,
    pub log: Vec<LogEntry>,
}

/// Replaces directory `to` by `from` so that some complete version exists at every moment.
pub fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    let old = to.with_extension("old");
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if to.exists() {
        std::fs::rename(to, &old)?;
    }
    std::fs::rename(from, to)
        .with_context(|| format!("cannot move {} into place", to.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

pub fn save_checkpoint(
    run_dir: &Path,
    state: &RunState,
    params: &ParamStore,
    opt: &AdamW,
) -> Result<()> {
    let dir = run_dir.join("checkpoint");
    let tmp = run_dir.join("checkpoint.partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let trainable: HashMap<String, Tensor> = params
        .trainable()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    save_safetensors(&tmp.join("trainable.safetensors"), &trainable, DType::F32)?;
    save_safetensors(&tmp.join("optimizer.safetensors"), &opt.state(), DType::F32)?;
    let mut state_json = serde_json::to_value(state)?;
    state_json["optimizer_steps"] = serde_json::json!(opt.t);
    crate::fsutil::write_json_atomic(&tmp.join("state.json"), &state_json)?;
    replace_dir(&tmp, &dir)
}

/// The newest complete checkpoint folder of `run_dir`, if it has one.
fn checkpoint_dir(run_dir: &Path) -> Option<PathBuf> {
    // `checkpoint.old` is the complete one when a save stopped between `replace_dir`'s renames.
    ["checkpoint", "checkpoint.old"]
        .iter()
        .map(|name| run_dir.join(name))
        .find(|dir| dir.join("state.json").exists())
}

/// Whether `run_dir` holds a checkpoint that `--resume` can continue.
pub fn has_checkpoint(run_dir: &Path) -> bool {
    checkpoint_dir(run_dir).is_some()
}

/// Restores the newest complete checkpoint of `run_dir` into `params` and `opt`.
pub fn load_checkpoint(
    run_dir: &Path,
    params: &ParamStore,
    opt: &mut AdamW,
) -> Result<Option<RunState>> {
    let Some(dir) = checkpoint_dir(run_dir) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(dir.join("state.json"))?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is corrupt", dir.join("state.json").display()))?;
    let t = raw["optimizer_steps"].as_u64().unwrap_or(0) as usize;
    let state: RunState = serde_json::from_value(raw)?;
    // Loaded to the CPU; each tensor moves to its parameter's device (the optimizer's too).
    let device = Device::Cpu;
    let tensors = candle_core::safetensors::load(dir.join("trainable.safetensors"), &device)?;
    for (name, var) in params.trainable() {
        let saved = tensors
            .get(name)
            .with_context(|| format!("checkpoint {} lacks `{name}`", dir.display()))?;
        if saved.dims() != var.dims() {
            anyhow::bail!(
                "checkpoint tensor `{name}` has shape {:?}, the model expects {:?}",
                saved.dims(),
                var.dims()
            );
        }
        var.set(&saved.to_device(var.device())?)?;
    }
    let opt_state = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &device)?;
    opt.load_state(&opt_state, t)?;
    Ok(Some(state))
}
