//! `dnatune bench`: training throughput of one model shape on this machine, measured on full
//! optimiser steps (forward, backward, AdamW) over random token ids.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::params::Trainable;
use crate::model::{self, LoadOptions};
use crate::ops::ForwardCtx;
use crate::train::config::{Method, TrainConfig};
use crate::train::optim::AdamW;

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub method: Method,
    pub batch_size: usize,
    pub seq_len: usize,
    pub threads: usize,
    pub steps: usize,
    pub params_total: usize,
    pub params_trainable: usize,
    pub seconds_per_step: f64,
    /// Where a step's time goes: forward (with loss), backward, optimiser update.
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub train_seq_per_s: f64,
    pub train_tokens_per_s: f64,
}

/// Times `steps` training steps after `warmup` untimed ones.
pub fn bench(
    model_dir: &Path,
    method: Method,
    batch_size: usize,
    seq_len: usize,
    warmup: usize,
    steps: usize,
) -> Result<BenchResult> {
    let device = Device::Cpu;
    let lora = match method {
        Method::Full => None,
        Method::Lora => Some(crate::train::lora_config(&TrainConfig::default())),
    };
    let opts = LoadOptions {
        num_labels: Some(2),
        trainable: match method {
            Method::Full => Trainable::All,
            Method::Lora => Trainable::AdaptersAndHead,
        },
        lora,
        ..LoadOptions::default()
    };
    let loaded = model::load_classifier(model_dir, None, &opts, &device)?;
    let vocab = loaded.config.vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let ids: Vec<u32> = (0..batch_size * seq_len)
        .map(|_| rng.random_range(5..vocab.max(6)))
        .collect();
    let ids = Tensor::from_vec(ids, (batch_size, seq_len), &device)?;
    let mask = Tensor::ones((batch_size, seq_len), candle_core::DType::U32, &device)?;
    let labels: Vec<u32> = (0..batch_size).map(|i| (i % 2) as u32).collect();
    let labels = Tensor::from_vec(labels, batch_size, &device)?;
    let mut opt = AdamW::new(loaded.params.trainable(), 0.9, 0.999, 1e-8, 0.01)?;
    let mut phases = [0f64; 3];
    let mut step = |s: usize, phases: &mut [f64; 3]| -> Result<()> {
        let t0 = Instant::now();
        let ctx = ForwardCtx::train(s as u64);
        let logits = loaded.model.forward(&ids, &mask, &ctx)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let t1 = Instant::now();
        let store = loss.backward()?;
        let grads: HashMap<String, Tensor> = loaded
            .params
            .trainable()
            .filter_map(|(n, v)| store.get(v).map(|g| (n.clone(), g.clone())))
            .collect();
        drop(store);
        let t2 = Instant::now();
        opt.step(&grads, 1e-4)?;
        let t3 = Instant::now();
        for (p, d) in phases.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
            *p += d.as_secs_f64();
        }
        Ok(())
    };
    for s in 0..warmup {
        step(s, &mut [0.0; 3])?;
    }
    let start = Instant::now();
    for s in 0..steps {
        step(warmup + s, &mut phases)?;
    }
    let secs = start.elapsed().as_secs_f64() / steps.max(1) as f64;
    let per_step = |p: f64| p / steps.max(1) as f64;
    Ok(BenchResult {
        method,
        batch_size,
        seq_len,
        threads: candle_core::utils::get_num_threads(),
        steps,
        params_total: loaded.params.num_params(),
        params_trainable: loaded.params.num_trainable(),
        seconds_per_step: secs,
        forward_s: per_step(phases[0]),
        backward_s: per_step(phases[1]),
        optimizer_s: per_step(phases[2]),
        train_seq_per_s: batch_size as f64 / secs,
        train_tokens_per_s: (batch_size * seq_len) as f64 / secs,
    })
}
