#!/usr/bin/env python3
"""The PyTorch side of `bench/race`: DNABERT-2 trained (or run) the way a careful PyTorch user would.

The model is the repository's independent reference module (tools/torch_reference/dnabert2.py)
with its attention switched to `F.scaled_dot_product_attention`, the ALiBi + padding bias passed
as `attn_mask` (the reference module computes the scores with plain matmuls, which is what this
benchmark must not charge to PyTorch). A classic BERT checkpoint (k-mer DNABERT) runs on
transformers' `BertForSequenceClassification` with SDPA attention, an ESM one (Nucleotide
Transformer) on transformers' `EsmForSequenceClassification` with SDPA attention and, for the v2
layout, the SwiGLU block of tools/torch_reference/nt_v2.py. Training uses
torch.optim.AdamW; LoRA uses peft `LoraConfig(r=8, lora_alpha=16, target_modules=["Wqkv"])`
(["query", "key", "value"] for classic BERT and ESM) with the pooler and the classifier trained in full
(`modules_to_save`), the setting dnatune's `bench --method lora` uses.

Modes (one JSON object on stdout, peak RSS from `resource.getrusage`, loading included):
  train:    `--method full|lora`: warm-up steps, then timed optimiser steps on a fixed random batch
  infer:    eval mode, `torch.inference_mode()`, forward passes over random batches
  tokenize: Python `tokenizers` on the sequences of a CSV (column `sequence`)
  matmul-rate: the bf16 matrix-product rate of the device (8192^3 products timed with CUDA
            events; the ceiling model FLOP utilisation is measured against)

`--bf16` runs the forward pass (and the loss) under `torch.autocast(device, dtype=torch.bfloat16)`,
PyTorch's own mixed precision: the counterpart of dnatune's `--precision bf16`. `--device cuda`
runs on the GPU; every timed region ends with `torch.cuda.synchronize()`, and the peak of
`torch.cuda.max_memory_allocated` is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def use_sdpa(dnabert2) -> None:
    """Replaces the reference attention's matmul-softmax-matmul with the fused SDPA call."""
    import torch.nn.functional as F

    def forward(self, x, bias):
        batch, length, _ = x.shape
        heads, head_dim = self.cfg.num_attention_heads, self.cfg.head_dim
        qkv = self.self.Wqkv(x).view(batch, length, 3, heads, head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        p = self.probs_dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        context = context.transpose(1, 2).reshape(batch, length, heads * head_dim)
        return self.output(context, x)

    dnabert2.Attention.forward = forward


def tensor_names(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return list(f.keys())


def is_esm(model_dir: Path) -> bool:
    """Whether the checkpoint is an ESM encoder (Nucleotide Transformer)."""
    return any(k.startswith("esm.") for k in tensor_names(model_dir))


def is_classic_bert(model_dir: Path) -> bool:
    """Whether the checkpoint is a classic BERT (separate query/key/value: k-mer DNABERT)."""
    return not is_esm(model_dir) and any(".attention.self.query." in k for k in tensor_names(model_dir))


def wrap_logits(model):
    """A transformers classifier called as `model(ids, mask)` and returning logits, like the
    reference module."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask).logits

    return Logits(model)


def load_esm(model_dir: Path, device: str):
    """transformers' EsmForSequenceClassification with SDPA attention (the v2 SwiGLU block when the
    config asks for it) holding the checkpoint's encoder; the head starts random, as dnatune's."""
    sys.path.insert(0, str(REPO / "tools" / "torch_reference"))
    from nt_v2 import load_esm_classifier

    config = json.loads((model_dir / "config.json").read_text())
    model = load_esm_classifier(model_dir, num_labels=2, attn_implementation="sdpa")
    return wrap_logits(model).to(device), config


def load_classic_bert(model_dir: Path, device: str):
    """transformers' own BertForSequenceClassification with SDPA attention, what a k-mer DNABERT
    user runs; called as `model(ids, mask)` and returning logits, like the reference module."""
    from transformers import BertForSequenceClassification

    bert = BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=2, attn_implementation="sdpa")
    config = json.loads((model_dir / "config.json").read_text())
    return wrap_logits(bert).to(device), config


def lora_targets(model_dir: Path) -> list[str]:
    """dnatune's default LoRA targets: every attention projection."""
    return ["query", "key", "value"] if is_classic_bert(model_dir) or is_esm(model_dir) else ["Wqkv"]


def load_model(model_dir: Path, device: str):
    """The reference classifier with the checkpoint's encoder weights; a head missing from the
    checkpoint (dnatune's `init-model` writes none) starts random, as dnatune's does. A classic
    BERT checkpoint loads into transformers' BERT instead."""
    import torch
    from safetensors.torch import load_file

    if is_esm(model_dir):
        return load_esm(model_dir, device)
    if is_classic_bert(model_dir):
        return load_classic_bert(model_dir, device)
    sys.path.insert(0, str(REPO / "tools" / "torch_reference"))
    import dnabert2

    config = json.loads((model_dir / "config.json").read_text())
    model = dnabert2.DnaBert2ForSequenceClassification(config)
    expected = set(model.state_dict())
    state = {k: v for k, v in load_file(str(model_dir / "model.safetensors")).items() if k in expected}
    missing = model.load_state_dict(state, strict=False).missing_keys
    head = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    if not set(missing) <= head:
        raise SystemExit(f"{model_dir}/model.safetensors lacks encoder weights: {sorted(set(missing) - head)}")

    # The SDPA path must give the reference module's logits before anything is timed.
    ids = torch.randint(5, config["vocab_size"], (2, 9), device=device)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    model.to(device).eval()
    with torch.no_grad():
        plain = model(ids, mask)
        use_sdpa(dnabert2)
        fused = model(ids, mask)
    if not torch.allclose(plain, fused, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"SDPA attention disagrees with the reference: {plain} vs {fused}")
    return model, config


def precision(args):
    """bf16 autocast when `--bf16` is given, else nothing."""
    import torch

    return torch.autocast(args.device, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def synchronize(args) -> None:
    """Waits for queued GPU work, so a host clock read after it covers that work."""
    import torch

    if args.device == "cuda":
        torch.cuda.synchronize()


def train(args) -> dict:
    import torch

    model, config = load_model(args.model, args.device)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=lora_targets(args.model),
            modules_to_save=["pooler", "classifier"],
        )
        model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config["vocab_size"], (args.batch_size, args.seq_len), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    labels = (torch.arange(args.batch_size) % 2).to(args.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with precision(args):
            loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    synchronize(args)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(args)
    secs = (time.perf_counter() - start) / args.steps
    return {
        "mode": "train",
        "method": args.method,
        "bf16": args.bf16,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in params),
        "seconds_per_step": secs,
        "seq_per_s": args.batch_size / secs,
    }


def infer(args) -> dict:
    import torch

    model, config = load_model(args.model, args.device)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(5, config["vocab_size"], (args.batch_size, args.seq_len), generator=gen).to(args.device)
        for _ in range(args.steps)
    ]
    mask = torch.ones_like(batches[0])

    def probabilities(ids):
        # As `predict` needs them: class probabilities in f32 on the host.
        return model(ids, mask).float().softmax(-1).cpu()

    with torch.inference_mode(), precision(args):
        for _ in range(args.warmup):
            probabilities(batches[0])
        synchronize(args)
        start = time.perf_counter()
        for ids in batches:
            probabilities(ids)
        synchronize(args)
        secs = time.perf_counter() - start
    return {
        "mode": "infer",
        "bf16": args.bf16,
        "sequences": args.batch_size * args.steps,
        "seconds": secs,
        "seq_per_s": args.batch_size * args.steps / secs,
    }


def tokenize(args) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.tokenizer))
    with open(args.sequences, newline="") as f:
        seqs = [row["sequence"] for row in csv.DictReader(f)]
    tok.encode_batch(seqs[:256])  # warm-up
    start = time.perf_counter()
    for s in seqs:
        tok.encode(s)
    one = time.perf_counter() - start
    start = time.perf_counter()
    tok.encode_batch(seqs)
    batch = time.perf_counter() - start
    return {
        "mode": "tokenize",
        "sequences": len(seqs),
        "seq_per_s_encode": len(seqs) / one,
        "seq_per_s_encode_batch": len(seqs) / batch,
        "seq_per_s": len(seqs) / min(one, batch),
    }


def matmul_rate(args) -> dict:
    """bf16 (n x n) @ (n x n) products on random data, timed with CUDA events after warm-up;
    three operand sets in rotation so no product reads the previous one's data from L2."""
    import torch

    if args.device != "cuda":
        raise SystemExit("matmul-rate needs --device cuda")
    n, reps = 8192, 20
    sets = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
             torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    for a, b in sets:
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps):
        a, b = sets[i % 3]
        a @ b
    end.record()
    torch.cuda.synchronize()
    secs = start.elapsed_time(end) / 1e3 / reps
    return {"mode": "matmul-rate", "n": n, "seconds": secs, "bf16_tflops": 2 * n**3 / secs / 1e12,
            "gpu": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["train", "infer", "tokenize", "matmul-rate"])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--method", choices=["full", "lora"], default="lora")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (train and infer)")
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--sequences", type=Path, help="CSV with a `sequence` column (tokenize mode)")
    args = ap.parse_args()
    if args.mode in ("train", "infer") and args.model is None:
        ap.error(f"{args.mode} needs --model")
    if args.mode == "tokenize" and (args.tokenizer is None or args.sequences is None):
        ap.error("tokenize needs --tokenizer and --sequences")
    if args.steps < 1 or args.warmup < 0:
        ap.error("need --steps >= 1 and --warmup >= 0")

    if args.mode != "tokenize":
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
    modes = {"train": train, "infer": infer, "tokenize": tokenize, "matmul-rate": matmul_rate}
    result = modes[args.mode](args)
    if args.mode != "tokenize":
        import torch

        result["torch"] = torch.__version__
        result["threads"] = torch.get_num_threads()
        if args.device == "cuda":
            result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
