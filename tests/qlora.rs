//! QLoRA end to end on a small DNABERT-2: the quantized base against its own dequantized weights,
//! where gradients go, the PEFT adapter layout, merging, and bad adapter directories.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use dnatune::model::config::{Architecture, ModelConfig};
use dnatune::model::params::Trainable;
use dnatune::model::{self, LoadOptions, LoadedModel};
use dnatune::ops::{ForwardCtx, Initializer};
use dnatune::peft::quant::QuantKind;
use dnatune::peft::{adapter, merge, LoraConfig};
use dnatune::tokenize::BpeTokenizer;

/// A random 2-layer DNABERT-2 with the bundled BPE tokenizer and no classification head.
fn tiny_base(dir: &Path) {
    let tok = BpeTokenizer::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("assets/tokenizers/dna-bpe-4096/tokenizer.json"),
    )
    .unwrap();
    let cfg = ModelConfig::new(Architecture::Dnabert2, 4096, 2, 32, 4, 80).unwrap();
    let mut params = model::init_params(&cfg, 2, 3).unwrap();
    params.entries.retain(|n, _| !model::params::is_head(n));
    model::save_model_dir(dir, &cfg, &params, &tok, DType::F32).unwrap();
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["Wqkv".into(), "wo".into()],
    }
}

fn load(
    dir: &Path,
    extra: Option<HashMap<String, Tensor>>,
    lora: Option<LoraConfig>,
    quantize: Option<QuantKind>,
    trainable: Trainable,
) -> LoadedModel {
    let opts = LoadOptions {
        num_labels: Some(2),
        trainable,
        lora,
        quantize,
        ..LoadOptions::default()
    };
    model::load_classifier(dir, extra, &opts, &Device::Cpu).unwrap()
}

fn batch() -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..3 * 11).map(|i| 5 + (i * 37 % 4000) as u32).collect();
    let ids = Tensor::from_vec(ids, (3, 11), &Device::Cpu).unwrap();
    let mut mask = vec![1u32; 33];
    mask[30..].iter_mut().for_each(|m| *m = 0);
    (ids, Tensor::from_vec(mask, (3, 11), &Device::Cpu).unwrap())
}

fn logits(m: &LoadedModel) -> Vec<f32> {
    let (ids, mask) = batch();
    m.model
        .forward(&ids, &mask, &ForwardCtx::eval())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The tensors (heads, adapters, dequantized base linear weights) that make a plain f32 model
/// compute what the quantized one does.
fn dequantized_override(m: &LoadedModel) -> HashMap<String, Tensor> {
    let mut out = m.params.tensors(|n| !n.contains(".lora_"));
    for (name, q) in &m.params.quantized {
        out.insert(
            name.clone(),
            Tensor::from_vec(q.dequantize(), q.shape(), &Device::Cpu).unwrap(),
        );
    }
    out
}

/// Gives every LoRA B a random value so that adapters change the output.
fn randomise_adapters(m: &LoadedModel) {
    let mut init = Initializer::new(17);
    for (name, var) in m.params.trainable() {
        if name.contains(".lora_B") {
            let v = init.normal(var.elem_count(), 0.2);
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn qlora_with_zero_b_equals_the_dequantized_base() {
    let dir = tempfile::tempdir().unwrap();
    tiny_base(dir.path());
    for kind in [QuantKind::Int8, QuantKind::Nf4] {
        let q = load(
            dir.path(),
            None,
            Some(lora()),
            Some(kind),
            Trainable::AdaptersAndHead,
        );
        // Every base linear layer (4 per layer x 2 layers) is quantized; heads are not.
        assert_eq!(q.params.quantized.len(), 8, "{kind}");
        assert!(q
            .params
            .quantized
            .keys()
            .all(|n| n.starts_with("bert.encoder.layer.")));
        assert!(q
            .params
            .entries
            .contains_key("bert.embeddings.word_embeddings.weight"));
        assert!(q
            .params
            .entries
            .contains_key("bert.encoder.layer.0.mlp.layernorm.weight"));
        let plain = load(
            dir.path(),
            Some(dequantized_override(&q)),
            None,
            None,
            Trainable::Nothing,
        );
        let (a, b) = (logits(&q), logits(&plain));
        assert!(max_diff(&a, &b) < 1e-5, "{kind}: {a:?} vs {b:?}");
        // And quantization really happened: the f32 base differs a little, not a lot.
        let full = load(
            dir.path(),
            Some(q.params.tensors(model::params::is_head)),
            None,
            None,
            Trainable::Nothing,
        );
        let d = max_diff(&a, &logits(&full));
        assert!(
            d > 0.0 && d < 0.05,
            "{kind}: quantized vs f32 base logits differ by {d}"
        );
    }
}

#[test]
fn qlora_gradients_reach_only_adapters_and_head() {
    let dir = tempfile::tempdir().unwrap();
    tiny_base(dir.path());
    let q = load(
        dir.path(),
        None,
        Some(lora()),
        Some(QuantKind::Nf4),
        Trainable::AdaptersAndHead,
    );
    randomise_adapters(&q);
    let (ids, mask) = batch();
    let out = q.model.forward(&ids, &mask, &ForwardCtx::eval()).unwrap();
    let labels = Tensor::new(&[0u32, 1, 1], &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&out, &labels).unwrap();
    let grads = loss.backward().unwrap();
    let mut trained = Vec::new();
    for (name, p) in &q.params.entries {
        match &p.var {
            Some(v) => {
                let g = grads
                    .get(v)
                    .unwrap_or_else(|| panic!("no gradient for {name}"));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0, "zero gradient for {name}");
                trained.push(name.clone());
            }
            None => assert!(
                grads.get(&p.tensor).is_none(),
                "frozen {name} got a gradient"
            ),
        }
    }
    assert!(trained
        .iter()
        .all(|n| n.contains(".lora_") || model::params::is_head(n)));
    // Layer 0's adapters get a gradient only through the quantized layers above them.
    assert!(trained.contains(&"bert.encoder.layer.0.attention.self.Wqkv.lora_A.weight".to_string()));
    assert_eq!(trained.len(), 2 * 2 * 2 + 4);
}

#[test]
fn qlora_adapter_has_the_peft_layout() {
    let dir = tempfile::tempdir().unwrap();
    tiny_base(dir.path());
    let q = load(
        dir.path(),
        None,
        Some(lora()),
        Some(QuantKind::Nf4),
        Trainable::AdaptersAndHead,
    );
    let out = tempfile::tempdir().unwrap();
    adapter::save_adapter(out.path(), &lora(), &q.params, dir.path()).unwrap();
    let raw =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut keys: Vec<&str> = raw.keys().map(String::as_str).collect();
    keys.sort();
    let mut expected = vec![
        "base_model.model.bert.pooler.dense.bias",
        "base_model.model.bert.pooler.dense.weight",
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
    ];
    for l in 0..2 {
        for m in ["attention.self.Wqkv", "mlp.wo"] {
            for ab in ["A", "B"] {
                expected.push(Box::leak(
                    format!("base_model.model.bert.encoder.layer.{l}.{m}.lora_{ab}.weight")
                        .into_boxed_str(),
                ));
            }
        }
    }
    expected.sort();
    assert_eq!(keys, expected);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let mut fields: Vec<&str> = cfg
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "base_model_name_or_path",
            "bias",
            "fan_in_fan_out",
            "inference_mode",
            "init_lora_weights",
            "lora_alpha",
            "lora_dropout",
            "modules_to_save",
            "peft_type",
            "r",
            "target_modules",
            "task_type"
        ]
    );
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["target_modules"], serde_json::json!(["Wqkv", "wo"]));
    assert!(cfg["modules_to_save"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("classifier")));
    // The LoRA A of a 32-wide Wqkv is (r, in) = (4, 32), B is (out, r) = (96, 4).
    let a = &raw["base_model.model.bert.encoder.layer.0.attention.self.Wqkv.lora_A.weight"];
    let b = &raw["base_model.model.bert.encoder.layer.0.attention.self.Wqkv.lora_B.weight"];
    assert_eq!((a.dims(), b.dims()), (&[4, 32][..], &[96, 4][..]));
}

#[test]
fn merged_model_equals_base_plus_adapter() {
    let dir = tempfile::tempdir().unwrap();
    tiny_base(dir.path());
    let adapted = load(
        dir.path(),
        None,
        Some(lora()),
        None,
        Trainable::AdaptersAndHead,
    );
    randomise_adapters(&adapted);
    let ad_dir = tempfile::tempdir().unwrap();
    adapter::save_adapter(ad_dir.path(), &lora(), &adapted.params, dir.path()).unwrap();
    // Adapter round trip is exact.
    let back = adapter::load_adapter(ad_dir.path(), &Device::Cpu).unwrap();
    for (name, var) in adapted.params.trainable() {
        let a: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = back.tensors[name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name}");
    }
    let out = tempfile::tempdir().unwrap();
    let summary = merge::merge_adapter(dir.path(), ad_dir.path(), out.path()).unwrap();
    assert_eq!(summary.merged_modules.len(), 4);
    assert!(summary.max_logit_diff < 1e-5);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.path().join(f).exists(), "{f}");
    }
    let merged = load(out.path(), None, None, None, Trainable::Nothing);
    assert!(
        merged.report.initialized.is_empty(),
        "{:?}",
        merged.report.initialized
    );
    let unmerged = load(
        dir.path(),
        Some(back.tensors),
        Some(lora()),
        None,
        Trainable::Nothing,
    );
    let (a, b) = (logits(&unmerged), logits(&merged));
    assert!(max_diff(&a, &b) < 1e-5, "{a:?} vs {b:?}");
    // The adapter mattered: the base alone (with the same head) differs.
    let heads = unmerged.params.tensors(model::params::is_head);
    let base = load(dir.path(), Some(heads), None, None, Trainable::Nothing);
    assert!(max_diff(&a, &logits(&base)) > 1e-3);
}

#[test]
fn bad_adapter_directories_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    tiny_base(dir.path());
    let adapted = load(
        dir.path(),
        None,
        Some(lora()),
        None,
        Trainable::AdaptersAndHead,
    );
    let ad = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let merge_err = |ad: &Path| {
        format!(
            "{:#}",
            merge::merge_adapter(dir.path(), ad, out.path())
                .err()
                .unwrap()
        )
    };
    // Missing config.
    assert!(merge_err(ad.path()).contains("adapter_config.json"));
    // A target that matches no module of the model.
    let mut wrong = lora();
    wrong.target_modules.push("query_proj".into());
    adapter::save_adapter(ad.path(), &wrong, &adapted.params, dir.path()).unwrap();
    let err = merge_err(ad.path());
    assert!(
        err.contains("query_proj") && err.contains("matches no linear layer"),
        "{err}"
    );
    // Rank mismatch between config and tensors.
    let mut r8 = lora();
    r8.r = 8;
    adapter::save_adapter(ad.path(), &r8, &adapted.params, dir.path()).unwrap();
    let err = merge_err(ad.path());
    assert!(err.contains("rank 4") && err.contains("r = 8"), "{err}");
    // Missing weights file.
    std::fs::remove_file(ad.path().join("adapter_model.safetensors")).unwrap();
    let err = merge_err(ad.path());
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("not found"),
        "{err}"
    );
    // Quantizing a fully trainable model is refused.
    let opts = LoadOptions {
        trainable: Trainable::All,
        quantize: Some(QuantKind::Nf4),
        ..LoadOptions::default()
    };
    let err = model::load_classifier(dir.path(), None, &opts, &Device::Cpu)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("quantized base"));
}
