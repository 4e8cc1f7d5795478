"""The Nucleotide Transformer v2 layout on transformers' own ESM classes.

transformers' `EsmForSequenceClassification` has everything the v2 checkpoints need (pre-LayerNorm
layers, rotary attention, the final LayerNorm, the `classifier.dense`/`classifier.out_proj` head)
except the feed-forward block: v2 projects to twice the intermediate width without a bias and
multiplies SiLU of the first half by the second half (`add_bias_fnn: false` in its config). This
module supplies that block and builds the classifier from a dnatune or NT `config.json`, so the
test fixtures (tools/make_fixtures.py) and the PyTorch side of `bench/race` use one definition.

    model = esm_classifier(json.load(open("config.json")), num_labels=2)
    model = load_esm_classifier(Path("model_dir"), num_labels=2)   # with the encoder's weights
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class SwiGluIntermediate(torch.nn.Module):
    """dense to 2 x intermediate, then silu(first half) * second half."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.dense = torch.nn.Linear(hidden, 2 * intermediate, bias=bias)

    def forward(self, x):
        gate, value = self.dense(x).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * value


class SwiGluOutput(torch.nn.Module):
    """dense back to the hidden width (dropout), plus the residual."""

    def __init__(self, intermediate: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.dense = torch.nn.Linear(intermediate, hidden, bias=bias)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x, residual):
        return self.dropout(self.dense(x)) + residual


def use_swiglu(model, hidden: int, intermediate: int, bias: bool, dropout: float) -> None:
    """Replaces every layer's feed-forward modules of an `EsmForSequenceClassification`."""
    for layer in model.esm.encoder.layer:
        layer.intermediate = SwiGluIntermediate(hidden, intermediate, bias)
        layer.output = SwiGluOutput(intermediate, hidden, bias, dropout)


def esm_classifier(config: dict, num_labels: int, attn_implementation: str = "eager"):
    """An `EsmForSequenceClassification` for `config` (a config.json as a dict); the v2 block when
    the config has `add_bias_fnn`, as the Nucleotide Transformer v2 code decides it."""
    from transformers import EsmConfig, EsmForSequenceClassification

    fields = {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "id2label", "label2id")}
    fields["num_labels"] = num_labels
    esm_config = EsmConfig(**fields)
    esm_config._attn_implementation = attn_implementation
    model = EsmForSequenceClassification(esm_config)
    if "add_bias_fnn" in config:
        use_swiglu(
            model,
            config["hidden_size"],
            config["intermediate_size"],
            bool(config["add_bias_fnn"]),
            config.get("hidden_dropout_prob", 0.0),
        )
    return model


def load_esm_classifier(model_dir: Path, num_labels: int, attn_implementation: str = "eager"):
    """`esm_classifier` for `model_dir/config.json` holding the encoder of `model.safetensors`. The
    head starts random (a base carries none); ESM's contact head and the rotary frequencies (a
    buffer) may be absent too; any other missing tensor is an error."""
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    model = esm_classifier(config, num_labels, attn_implementation)
    expected = set(model.state_dict())
    state = {k: v for k, v in load_file(str(model_dir / "model.safetensors")).items() if k in expected}
    missing = model.load_state_dict(state, strict=False).missing_keys
    if any(not k.startswith(("classifier.", "esm.contact_head.")) and not k.endswith("inv_freq") for k in missing):
        raise SystemExit(f"{model_dir}/model.safetensors lacks encoder weights: {sorted(missing)}")
    return model
