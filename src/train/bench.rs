//! `dnatune bench`: training throughput of one model shape on this machine, measured on full
//! optimiser steps (forward, backward, AdamW) over random token ids; with `--memory`, the bytes
//! of weights, gradients and optimizer state and the peak resident memory of a training step.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::params::Trainable;
use crate::model::{self, LoadOptions, LoadedModel};
use crate::ops::ForwardCtx;
use crate::peft::bf16::Precision;
use crate::train::config::{Method, TrainConfig};
use crate::train::loss::weighted_nll_sum;
use crate::train::optim::AdamW;

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub method: Method,
    /// How the frozen base's linear weights are held.
    pub precision: Precision,
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

/// What a measurement runs on: a model directory, a batch of `batch_size` random sequences of
/// `seq_len` tokens, the device, and the precision of the frozen base.
pub struct BenchSpec<'a> {
    pub model_dir: &'a Path,
    pub batch_size: usize,
    pub seq_len: usize,
    pub device: &'a Device,
    pub precision: Precision,
}

/// Times `steps` training steps after `warmup` untimed ones.
pub fn bench(spec: &BenchSpec, method: Method, warmup: usize, steps: usize) -> Result<BenchResult> {
    let (batch_size, seq_len) = (spec.batch_size, spec.seq_len);
    let mut run = Runner::new(spec, method)?;
    let mut phases = [0f64; 3];
    for s in 0..warmup {
        run.step(s, &mut [0.0; 3])?;
    }
    let start = Instant::now();
    for s in 0..steps {
        run.step(warmup + s, &mut phases)?;
    }
    let secs = start.elapsed().as_secs_f64() / steps.max(1) as f64;
    let per_step = |p: f64| p / steps.max(1) as f64;
    let loaded = &run.loaded;
    Ok(BenchResult {
        method,
        precision: spec.precision,
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

/// A model loaded for `method` with a fixed random batch and an optimizer.
struct Runner {
    loaded: LoadedModel,
    ids: Tensor,
    mask: Tensor,
    labels: Tensor,
    /// One weight per sequence, as the training loop passes its class weights.
    weights: Tensor,
    opt: AdamW,
}

impl Runner {
    fn new(spec: &BenchSpec, method: Method) -> Result<Self> {
        let (batch_size, device) = (spec.batch_size, spec.device);
        let opts = LoadOptions {
            num_labels: Some(2),
            trainable: if method.uses_adapters() {
                Trainable::AdaptersAndHead
            } else {
                Trainable::All
            },
            lora: method
                .uses_adapters()
                .then(|| crate::train::lora_config(&TrainConfig::default())),
            quantize: method.quantize(),
            precision: spec.precision,
            ..LoadOptions::default()
        };
        let loaded = model::load_classifier(spec.model_dir, None, &opts, device)?;
        let (ids, mask) = random_batch(loaded.config.vocab_size, spec)?;
        let labels: Vec<u32> = (0..batch_size).map(|i| (i % 2) as u32).collect();
        let labels = Tensor::from_vec(labels, batch_size, device)?;
        let weights = Tensor::ones(batch_size, DType::F32, device)?;
        let opt = AdamW::new(loaded.params.trainable(), 0.9, 0.999, 1e-8, 0.01)?;
        Ok(Runner {
            loaded,
            ids,
            mask,
            labels,
            weights,
            opt,
        })
    }

    /// One optimizer step, adding its forward, backward and update times to `phases`; returns
    /// the bytes of the gradients it applied.
    fn step(&mut self, s: usize, phases: &mut [f64; 3]) -> Result<usize> {
        let t0 = Instant::now();
        let ctx = ForwardCtx::train(s as u64);
        let logits = self.loaded.model.forward(&self.ids, &self.mask, &ctx)?;
        // The training loop's loss: a weighted sum over the batch, here with unit weights.
        let nll_sum = weighted_nll_sum(&logits, &self.labels, &self.weights)?;
        let loss = (nll_sum / self.labels.dim(0)? as f64)?;
        // GPU work is asynchronous: wait for it so each phase is charged its own time.
        let device = self.ids.device();
        device.synchronize()?;
        let t1 = Instant::now();
        let store = loss.backward()?;
        let grads = self.loaded.params.gradients(&store);
        drop(store);
        device.synchronize()?;
        let t2 = Instant::now();
        self.opt.step(&grads, 1e-4)?;
        device.synchronize()?;
        let t3 = Instant::now();
        for (p, d) in phases.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
            *p += d.as_secs_f64();
        }
        Ok(grads.values().map(tensor_bytes).sum())
    }
}

/// Token ids drawn uniformly from the non-special part of the vocabulary, no padding.
fn random_batch(vocab: usize, spec: &BenchSpec) -> Result<(Tensor, Tensor)> {
    let (batch_size, seq_len, device) = (spec.batch_size, spec.seq_len, spec.device);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let ids: Vec<u32> = (0..batch_size * seq_len)
        .map(|_| rng.random_range(5..(vocab as u32).max(6)))
        .collect();
    let ids = Tensor::from_vec(ids, (batch_size, seq_len), device)?;
    let mask = Tensor::ones((batch_size, seq_len), candle_core::DType::U32, device)?;
    Ok((ids, mask))
}

/// Inference throughput: forward passes as `predict` runs them (frozen weights, no graph,
/// no dropout), class probabilities copied back to the host.
#[derive(Debug, Serialize)]
pub struct InferenceResult {
    pub precision: Precision,
    pub batch_size: usize,
    pub seq_len: usize,
    pub threads: usize,
    pub batches: usize,
    pub seconds_per_batch: f64,
    pub infer_seq_per_s: f64,
}

pub fn bench_inference(spec: &BenchSpec, warmup: usize, batches: usize) -> Result<InferenceResult> {
    let opts = LoadOptions {
        num_labels: Some(2),
        trainable: Trainable::Nothing,
        precision: spec.precision,
        ..LoadOptions::default()
    };
    let loaded = model::load_classifier(spec.model_dir, None, &opts, spec.device)?;
    let (ids, mask) = random_batch(loaded.config.vocab_size, spec)?;
    let ctx = ForwardCtx::eval();
    let forward = || -> Result<Vec<Vec<f32>>> {
        let logits = loaded.model.forward(&ids, &mask, &ctx)?;
        Ok(crate::ops::softmax_last(&logits)?.to_vec2()?)
    };
    for _ in 0..warmup {
        forward()?;
    }
    let start = Instant::now();
    for _ in 0..batches {
        forward()?;
    }
    let secs = start.elapsed().as_secs_f64() / batches.max(1) as f64;
    Ok(InferenceResult {
        precision: spec.precision,
        batch_size: spec.batch_size,
        seq_len: spec.seq_len,
        threads: candle_core::utils::get_num_threads(),
        batches,
        seconds_per_batch: secs,
        infer_seq_per_s: spec.batch_size as f64 / secs,
    })
}

/// Tokenization throughput of a model's tokenizer over real sequences.
#[derive(Debug, Serialize)]
pub struct TokenizeResult {
    pub sequences: usize,
    pub rounds: usize,
    pub threads: usize,
    pub tokens_per_sequence: f64,
    pub tokenize_seq_per_s: f64,
}

/// Encodes `sequences` untruncated with [`crate::train::encode_all`] (what training and
/// `predict` run) `rounds` times after one warm-up round.
pub fn bench_tokenize(
    model_dir: &Path,
    sequences: &[crate::data::Record],
    rounds: usize,
) -> Result<TokenizeResult> {
    let tokenizer = crate::tokenize::load_tokenizer(model_dir)?;
    let encode = || crate::train::encode_all(sequences, tokenizer.as_ref(), usize::MAX);
    let tokens: usize = encode().iter().map(Vec::len).sum();
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(encode());
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(TokenizeResult {
        sequences: sequences.len(),
        rounds,
        threads: rayon::current_num_threads(),
        tokens_per_sequence: tokens as f64 / sequences.len().max(1) as f64,
        tokenize_seq_per_s: (sequences.len() * rounds) as f64 / secs,
    })
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Memory of one method's training step.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct MemoryResult {
    pub method: Method,
    pub precision: Precision,
    pub batch_size: usize,
    pub seq_len: usize,
    pub params_total: usize,
    pub params_trainable: usize,
    /// All weights as held (quantized ones at their stored size).
    pub weight_bytes: usize,
    /// The quantized linear weights as stored, and the same weights at f32 (0 without QLoRA).
    pub quantized_linear_bytes: usize,
    pub quantized_linear_f32_bytes: usize,
    /// Gradients of one step (only trainable tensors receive any).
    pub grad_bytes: usize,
    /// AdamW's first and second moments.
    pub optimizer_bytes: usize,
    /// Resident memory once the model is loaded and quantized, before any step.
    pub rss_after_load_bytes: Option<u64>,
    /// Peak resident memory while running the training steps (high-water mark reset after
    /// loading, so the transient f32 copy of a quantized checkpoint does not count).
    pub peak_rss_step_bytes: Option<u64>,
    /// Whether the high-water mark could be reset; if not, the peak includes loading.
    pub peak_reset: bool,
    /// Peak resident memory of the whole process (loading included).
    pub peak_rss_process_bytes: Option<u64>,
}

/// A field of /proc/self/status in bytes (Linux; `None` elsewhere).
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Resets the peak-RSS counter (VmHWM) to the current RSS; Linux >= 4.0.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Loads the model for `method`, runs `steps` training steps and reports memory. Run it in a
/// process of its own (the CLI re-invokes itself per method) so that peaks do not mix.
pub fn bench_memory(spec: &BenchSpec, method: Method, steps: usize) -> Result<MemoryResult> {
    let (batch_size, seq_len) = (spec.batch_size, spec.seq_len);
    let mut run = Runner::new(spec, method)?;
    let rss_after_load_bytes = proc_status_bytes("VmRSS");
    let load_peak = proc_status_bytes("VmHWM");
    let peak_reset = reset_peak_rss();
    let mut grad_bytes = 0;
    for s in 0..steps.max(1) {
        grad_bytes = run.step(s, &mut [0.0; 3])?;
    }
    let peak_rss_step_bytes = proc_status_bytes("VmHWM");
    let params = &run.loaded.params;
    let optimizer_bytes = run.opt.state().values().map(tensor_bytes).sum();
    Ok(MemoryResult {
        method,
        precision: spec.precision,
        batch_size,
        seq_len,
        params_total: params.num_params(),
        params_trainable: params.num_trainable(),
        weight_bytes: params.weight_bytes(),
        quantized_linear_bytes: params.quantized.values().map(|q| q.storage_bytes()).sum(),
        quantized_linear_f32_bytes: params.quantized.values().map(|q| 4 * q.numel()).sum(),
        grad_bytes,
        optimizer_bytes,
        rss_after_load_bytes,
        peak_rss_step_bytes,
        peak_reset,
        peak_rss_process_bytes: load_peak.max(peak_rss_step_bytes),
    })
}
