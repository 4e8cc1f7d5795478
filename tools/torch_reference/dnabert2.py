"""Independent PyTorch reference implementation of the DNABERT-2 encoder and classifier.

Written from the architecture description (not derived from the published ``bert_layers.py``) so
that dnatune's Rust implementation can be checked against a second, separately written model. It
is also meant to be imported by later tooling (PEFT interop, speed comparisons), so it depends only
on torch and safetensors and keeps the state_dict names of the released checkpoints:

    bert.embeddings.word_embeddings.weight
    bert.embeddings.token_type_embeddings.weight
    bert.embeddings.LayerNorm.{weight,bias}
    bert.encoder.layer.{i}.attention.self.Wqkv.{weight,bias}
    bert.encoder.layer.{i}.attention.output.dense.{weight,bias}
    bert.encoder.layer.{i}.attention.output.LayerNorm.{weight,bias}
    bert.encoder.layer.{i}.mlp.gated_layers.weight
    bert.encoder.layer.{i}.mlp.wo.{weight,bias}
    bert.encoder.layer.{i}.mlp.layernorm.{weight,bias}
    bert.pooler.dense.{weight,bias}
    classifier.{weight,bias}

Architecture, in short:
  * embeddings: word + token-type (type 0 by default), no position embeddings, LayerNorm, dropout;
  * attention: one fused ``Wqkv`` projection split into q, k, v (each head's channels contiguous),
    scaled dot product plus an ALiBi bias ``-slope_h * |i - j|`` plus ``(1 - mask) * -10000`` on
    padded keys, softmax, dropout, then ``dense`` + dropout + post-LayerNorm with the residual;
  * MLP: ``gated_layers`` (no bias) to 2 * intermediate channels, exact-erf GELU of the first half
    times the second half, dropout, ``wo``, post-LayerNorm with the residual;
  * pooler: tanh(dense(hidden at position 0)); classifier: dropout then a linear layer.

Usage:
    model = DnaBert2ForSequenceClassification.from_pretrained("tests/fixtures/tiny-dnabert2")
    logits = model(input_ids, attention_mask)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DnaBert2Config",
    "DnaBert2ForSequenceClassification",
    "DnaBert2Model",
    "alibi_bias",
    "alibi_slopes",
]


def alibi_slopes(n_heads: int) -> list[float]:
    """Per-head ALiBi slopes.

    For a power-of-two head count n the slopes are the geometric sequence 2^(-8(k+1)/n),
    k = 0..n-1. Otherwise, with p the largest power of two below n, they are the p slopes of a
    p-head model followed by the even-indexed slopes (0, 2, 4, ...) of a 2p-head model, keeping
    n slopes in total.
    """
    if n_heads < 1:
        raise ValueError(f"need at least one attention head, got {n_heads}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (k + 1) / n) for k in range(n)]

    p = 1 << (n_heads.bit_length() - 1)  # largest power of two <= n_heads
    if p == n_heads:
        return geometric(n_heads)
    return (geometric(p) + geometric(2 * p)[0::2])[:n_heads]


def alibi_bias(n_heads: int, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi bias of shape [heads, length, length]: -slope_h * |i - j| (symmetric, bidirectional)."""
    positions = torch.arange(length)
    distance = (positions[None, :] - positions[:, None]).abs().to(dtype)
    slopes = torch.tensor(alibi_slopes(n_heads), dtype=dtype)
    return -slopes[:, None, None] * distance[None, :, :]


class DnaBert2Config:
    """The fields of a DNABERT-2 ``config.json`` this module uses, with the released defaults."""

    def __init__(self, config: dict[str, Any]):
        self.vocab_size: int = config["vocab_size"]
        self.hidden_size: int = config["hidden_size"]
        self.num_hidden_layers: int = config["num_hidden_layers"]
        self.num_attention_heads: int = config["num_attention_heads"]
        self.intermediate_size: int = config["intermediate_size"]
        self.type_vocab_size: int = config.get("type_vocab_size", 2)
        self.layer_norm_eps: float = config.get("layer_norm_eps", 1e-12)
        self.hidden_dropout_prob: float = config.get("hidden_dropout_prob", 0.1)
        self.attention_probs_dropout_prob: float = config.get("attention_probs_dropout_prob", 0.0)
        dropout = config.get("classifier_dropout")
        self.classifier_dropout: float = self.hidden_dropout_prob if dropout is None else dropout
        if "num_labels" in config:
            self.num_labels: int = config["num_labels"]
        elif "id2label" in config:
            self.num_labels = len(config["id2label"])
        else:
            self.num_labels = 2
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        self.head_dim = self.hidden_size // self.num_attention_heads


class Embeddings(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Holds the fused projection; named ``self`` inside ``Attention`` to match checkpoint keys."""

    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)


class AttentionOutput(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.cfg = cfg
        # An attribute literally named `self` gives the checkpoints' `attention.self.Wqkv` keys.
        self.self = SelfAttention(cfg)
        self.output = AttentionOutput(cfg)
        self.probs_dropout = nn.Dropout(cfg.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [batch, len, hidden]; bias: additive scores bias broadcastable to [batch, heads, len, len]."""
        batch, length, _ = x.shape
        heads, head_dim = self.cfg.num_attention_heads, self.cfg.head_dim
        qkv = self.self.Wqkv(x).view(batch, length, 3, heads, head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each [batch, heads, len, head_dim]
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias
        probs = self.probs_dropout(scores.softmax(dim=-1))
        context = (probs @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
        return self.output(context, x)


class GatedMlp(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gated_layers = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.gated_layers(x)
        gate = projected[..., : self.intermediate_size]
        value = projected[..., self.intermediate_size :]
        hidden = self.dropout(F.gelu(gate, approximate="none") * value)
        return self.layernorm(self.wo(hidden) + x)


class Layer(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.attention = Attention(cfg)
        self.mlp = GatedMlp(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attention(x, bias))


class Encoder(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class DnaBert2Model(nn.Module):
    """The encoder with its pooler; ``forward`` returns (sequence output, pooled output)."""

    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embeddings(input_ids, token_type_ids)
        length = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Padded keys get -10000, as the released model does (not -inf, so all-pad rows stay finite).
        padding = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * -10000.0
        bias = alibi_bias(self.cfg.num_attention_heads, length, x.dtype).to(x.device)[None] + padding
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x, self.pooler(x)


class DnaBert2ForSequenceClassification(nn.Module):
    """DNABERT-2 with the sequence-classification head: dropout + linear on the pooled output."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        cfg = DnaBert2Config(config)
        self.bert = DnaBert2Model(cfg)
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask: [batch, len] integer tensors. Returns logits [batch, labels]."""
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(pooled))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DnaBert2ForSequenceClassification:
        """Builds the model from ``config.json`` and loads ``model.safetensors`` strictly."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        model = cls(config)
        state = load_file(str(directory / "model.safetensors"))
        model.load_state_dict(state, strict=True)
        return model.eval()
