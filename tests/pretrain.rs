//! Pre-training on a small real slice of the shipped corpus lowers the held-out MLM loss, writes
//! a model directory that fine-tuning loads, and resumes.

use std::path::Path;

use candle_core::DType;
use dnatune::model::config::{Architecture, ModelConfig};
use dnatune::model::params::is_head;
use dnatune::pretrain::{self, PretrainConfig};
use dnatune::tokenize::{BpeTokenizer, Tokenizer};

#[test]
fn mlm_pretraining_lowers_validation_loss_and_resumes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tokenizer =
        BpeTokenizer::from_file(&root.join("assets/tokenizers/dna-bpe-4096/tokenizer.json"))
            .unwrap();
    let cfg = ModelConfig::new(
        Architecture::Dnabert2,
        tokenizer.vocab_size(),
        2,
        64,
        2,
        128,
    )
    .unwrap();
    let mut params = dnatune::model::init_params(&cfg, 2, 1).unwrap();
    params.entries.retain(|n, _| !is_head(n));
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    dnatune::model::save_model_dir(&base, &cfg, &params, &tokenizer, DType::F32).unwrap();

    let out = tmp.path().join("pretrain");
    let mut pcfg = PretrainConfig {
        model: base,
        corpus: root.join("tests/fixtures/pretrain-slice.fa.gz"),
        out: out.clone(),
        max_steps: 200,
        batch_size: 16,
        seq_len: 32,
        lr: 2e-3,
        valid_fraction: 0.05,
        eval_every: 100,
        checkpoint_every: 100,
        ..PretrainConfig::default()
    };
    // Stop half-way as an interruption would, then resume to the end.
    pcfg.max_steps = 200;
    pcfg.time_limit_minutes = 1e-9;
    let partial = pretrain::run(&pcfg, false).unwrap();
    assert!(partial.steps < 200, "the time limit did not stop the run");
    pcfg.time_limit_minutes = 0.0;
    let done = pretrain::run(&pcfg, true).unwrap();
    assert_eq!(done.steps, 200);
    assert!(
        done.valid_loss < done.first_valid_loss - 0.5,
        "validation MLM loss {} -> {}",
        done.first_valid_loss,
        done.valid_loss
    );
    // The saved directory carries the MLM head and loads as a classifier (head ignored).
    let model_dir = out.join("model");
    let (weights, _) =
        dnatune::model::checkpoint::load_weights(&model_dir, &candle_core::Device::Cpu).unwrap();
    assert!(weights.contains_key("cls.predictions.transform.dense.weight"));
    assert!(weights.contains_key("cls.predictions.decoder.bias"));
    let loaded = dnatune::model::load_classifier(
        &model_dir,
        None,
        &dnatune::model::LoadOptions::default(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(
        loaded.notes.iter().any(|n| n.contains("masked-LM head")),
        "{:?}",
        loaded.notes
    );
}
