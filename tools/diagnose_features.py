"""What a DNABERT-2-architecture encoder's features hold for a labelled task, before and after fine-tuning.

Two checks behind the "Fine-tuning it" section of models/README.md, both with the independent PyTorch
reference encoder (tools/torch_reference/dnabert2.py); needs torch, numpy, safetensors and tokenizers
(the bench/race environment has them):

  probe   a logistic-regression probe (L-BFGS, features standardised on the training rows) on the
          frozen [CLS] and mean-pooled final hidden states of one or more model directories, trained on
          the first --train-rows of train.csv and scored by MCC on dev.csv. Tells whether the features
          carry the signal, independently of how fine-tuning behaves.
  spread  for one weights file (a model directory's model.safetensors, or a run's
          checkpoint/trainable.safetensors laid over --base), the spread across sequences of the
          mean-pooled output of the embeddings and of every layer, on the first 256 dev sequences.
          A fine-tuning run that collapsed shows a spread near zero from some layer on.

    python tools/diagnose_features.py probe --task ../shared/data/gue/mouse/0 \\
        models/dnatune-dnabert2-small runs/results/scratch-model
    python tools/diagnose_features.py spread --task ../shared/data/gue/mouse/0 \\
        --base models/dnatune-dnabert2-small --weights RUN/checkpoint/trainable.safetensors
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "torch_reference"))
from dnabert2 import DnaBert2ForSequenceClassification  # noqa: E402

PAD_ID = 3


def read_task(task: Path, split: str, rows: int) -> tuple[list[str], np.ndarray]:
    with (task / f"{split}.csv").open() as f:
        records = list(csv.DictReader(f))[:rows]
    return [r["sequence"] for r in records], np.array([int(r["label"]) for r in records])


def load_encoder(base: Path, weights: Path | None = None) -> DnaBert2ForSequenceClassification:
    """The encoder of `base` (config and weights), with `weights` laid over it when given."""
    config = json.loads((base / "config.json").read_text())
    config["num_labels"] = 2
    model = DnaBert2ForSequenceClassification(config)
    state = {k: v.float() for k, v in load_file(str(base / "model.safetensors")).items() if not k.startswith("cls.")}
    if weights is not None:
        state.update({k: v.float() for k, v in load_file(str(weights)).items()})
    model.load_state_dict(state, strict=False)
    return model.eval()


def batch(tokenizer: Tokenizer, seqs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer.encode_batch(seqs)
    length = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [PAD_ID] * (length - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (length - len(e.ids)) for e in enc])
    return ids, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def features(model, tokenizer: Tokenizer, seqs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """([CLS] state, mean-pooled state) of the last layer, one row per sequence."""
    cls, mean = [], []
    with torch.no_grad():
        for i in range(0, len(seqs), 256):
            ids, mask = batch(tokenizer, seqs[i : i + 256])
            hidden, _ = model.bert(ids, mask)
            cls.append(hidden[:, 0])
            mean.append(mean_pool(hidden, mask))
    return torch.cat(cls).numpy(), torch.cat(mean).numpy()


def mcc(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float(((pred == 1) & (truth == 1)).sum())
    tn = float(((pred == 0) & (truth == 0)).sum())
    fp = float(((pred == 1) & (truth == 0)).sum())
    fn = float(((pred == 0) & (truth == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


def probe_mcc(x_train: np.ndarray, y_train: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray) -> float:
    """Dev MCC of an L2-regularised logistic regression on standardised features."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x = torch.tensor((x_train - mu) / sd)
    y = torch.tensor(y_train, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = ((torch.tensor((x_dev - mu) / sd) @ w + b) > 0).numpy().astype(int)
    return mcc(pred, y_dev)


def probe(args) -> None:
    train, y_train = read_task(args.task, "train", args.train_rows)
    dev, y_dev = read_task(args.task, "dev", 10**9)
    for model_dir in args.models:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        model = load_encoder(model_dir)
        f_train, f_dev = features(model, tokenizer, train), features(model, tokenizer, dev)
        for name, k in (("cls", 0), ("mean", 1)):
            unit = f_train[k] / np.linalg.norm(f_train[k], axis=1, keepdims=True)
            cosine = float((unit[:500] @ unit[:500].T).mean())
            score = probe_mcc(f_train[k], y_train, f_dev[k], y_dev)
            print(f"{model_dir}  {name:4s}  mean cosine {cosine:.3f}  probe dev MCC {score:.3f}", flush=True)


def spread(args) -> None:
    seqs, _ = read_task(args.task, "dev", 256)
    tokenizer = Tokenizer.from_file(str(args.base / "tokenizer.json"))
    model = load_encoder(args.base, args.weights)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, out):
            outputs[name] = out[0] if isinstance(out, tuple) else out

        return hook

    model.bert.embeddings.register_forward_hook(keep("embeddings"))
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.register_forward_hook(keep(f"layer {i + 1}"))
    ids, mask = batch(tokenizer, seqs)
    with torch.no_grad():
        model.bert(ids, mask)
    for name, hidden in outputs.items():
        pooled = mean_pool(hidden, mask)
        print(
            f"{name:10s}  spread across sequences {float(pooled.std(0).mean()):.4f}  "
            f"mean |h| {float(hidden.abs().mean()):.3f}  max |h| {float(hidden.abs().max()):.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--task", type=Path, required=True, help="directory with train.csv and dev.csv")
    p.add_argument("--train-rows", type=int, default=3000)
    p.add_argument("models", type=Path, nargs="+")
    s = sub.add_parser("spread")
    s.add_argument("--task", type=Path, required=True)
    s.add_argument("--base", type=Path, required=True, help="model directory (config, tokenizer, weights)")
    s.add_argument("--weights", type=Path, help="safetensors laid over the base (a run's trained tensors)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    probe(args) if args.command == "probe" else spread(args)


if __name__ == "__main__":
    main()
