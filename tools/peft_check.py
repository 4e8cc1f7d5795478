#!/usr/bin/env python3
"""Check that a dnatune adapter loads in Python PEFT and gives the same predictions.

Loads the base model with a PyTorch module (by default the project's independent DNABERT-2 in
tools/torch_reference/dnabert2.py; --module/--class point to another one; an ESM base, a Nucleotide
Transformer, loads into transformers' EsmForSequenceClassification, with the v2 SwiGLU block of
tools/torch_reference/nt_v2.py when its config has `add_bias_fnn`), applies the adapter
with ``peft.PeftModel.from_pretrained``, and prints its logits for a few sequences next to what
``dnatune predict --adapter`` gives for the same sequences.

dnatune writes class probabilities, which fix logits only up to a shared shift, so the check
compares probabilities and the log-odds between classes (logit_c - logit_0).

Usage (needs torch, transformers, peft, safetensors, tokenizers; not run in CI):
    python tools/peft_check.py --base BASE_DIR --adapter ADAPTER_DIR \
        [--sequences ACGT... ACGT...] [--dnatune target/debug/dnatune]
Without --sequences the first four sequences of data/gue-tf0/test.csv are used.
Exit status 1 when the largest probability difference exceeds --tol (default 1e-4).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return getattr(module, name)


def build_base(base: Path, adapter: Path, cls) -> torch.nn.Module:
    """The base model with the adapter's class count; head weights come from the adapter."""
    from safetensors.torch import load_file

    config = json.loads((base / "config.json").read_text())
    head = load_file(str(adapter / "adapter_model.safetensors"))
    for key, t in head.items():
        if key.endswith("classifier.weight"):
            config["num_labels"] = t.shape[0]
    model = cls(config)
    missing, unexpected = model.load_state_dict(load_file(str(base / "model.safetensors")), strict=False)
    # A base written by `dnatune init-model` or pre-training has no head: the adapter brings it.
    not_head = [k for k in missing if not k.startswith(("bert.pooler.", "classifier."))]
    # A pre-trained base also carries its masked-LM head (`cls.*`), which classification ignores.
    unexpected = [k for k in unexpected if not k.startswith("cls.")]
    if not_head or unexpected:
        raise SystemExit(f"base weights do not fit the module: missing {not_head}, unexpected {unexpected}")
    return model.eval()


def is_esm(config: dict) -> bool:
    return config.get("model_type") == "esm" or "esm" in json.dumps(config.get("auto_map", {}))


def build_esm(base: Path, adapter: Path) -> torch.nn.Module:
    """transformers' ESM classifier with the base's encoder; the head comes from the adapter."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tools" / "torch_reference"))
    from nt_v2 import load_esm_classifier

    head = load_file(str(adapter / "adapter_model.safetensors"))
    labels = next(t.shape[0] for k, t in head.items() if k.endswith("classifier.out_proj.weight"))
    return load_esm_classifier(base, num_labels=labels).eval()


def nt_rows(vocab_txt: Path, seqs: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """The Nucleotide Transformer's ids from transformers' EsmTokenizer on its vocab.txt, as the
    released tokenizers are set up (no end token): <cls> + the longest vocabulary matches from the
    left, truncated to max_len; and the pad id."""
    from transformers import EsmTokenizer

    tokenizer = EsmTokenizer(vocab_file=str(vocab_txt), eos_token=None)
    rows = [tokenizer(seq, truncation=True, max_length=max_len)["input_ids"] for seq in seqs]
    return rows, tokenizer.pad_token_id


def encode(base: Path, seqs: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] + tokens + [SEP], truncated and right-padded, as dnatune encodes: BPE from the base's
    tokenizer.json, or Nucleotide Transformer k-mers from its vocab.txt."""
    if not (base / "tokenizer.json").exists():
        rows, pad_id = nt_rows(base / "vocab.txt", seqs, max_len)
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(base / "tokenizer.json"))
        cls_id, sep_id, pad_id = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
        rows = [[cls_id] + tok.encode(s, add_special_tokens=False).ids[: max_len - 2] + [sep_id] for s in seqs]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def dnatune_probs(exe: str, base: Path, adapter: Path, seqs: list[str], max_len: int) -> list[list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.csv", Path(tmp) / "out.csv"
        with inp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "sequence"])
            w.writerows([[f"s{i}", s] for i, s in enumerate(seqs)])
        cmd = [exe, "predict", "--model", str(base), "--adapter", str(adapter), "--input", str(inp),
               "--out", str(out), "--max-length", str(max_len)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        with out.open() as f:
            rows = list(csv.DictReader(f))
    return [[float(r[k]) for k in sorted((k for k in r if k.startswith("prob_")), key=lambda k: int(k[5:]))]
            for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--sequences", nargs="*")
    ap.add_argument("--dnatune", default=None, help="dnatune executable (default: PATH, then target/)")
    ap.add_argument("--module", type=Path, default=ROOT / "tools/torch_reference/dnabert2.py")
    ap.add_argument("--class", dest="cls", default="DnaBert2ForSequenceClassification")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    from peft import PeftModel

    seqs = args.sequences
    if not seqs:
        with (ROOT / "data/gue-tf0/test.csv").open() as f:
            seqs = [r["sequence"] for _, r in zip(range(4), csv.DictReader(f))]
    exe = args.dnatune or shutil.which("dnatune")
    if exe is None:
        for cand in (ROOT / "target/release/dnatune", ROOT / "target/debug/dnatune"):
            if cand.exists():
                exe = str(cand)
                break
    if exe is None:
        raise SystemExit("dnatune executable not found; pass --dnatune PATH")

    config = json.loads((args.base / "config.json").read_text())
    if is_esm(config):
        base = build_esm(args.base, args.adapter)

        def forward(model, ids, mask):
            return model(input_ids=ids, attention_mask=mask).logits
    else:
        base = build_base(args.base, args.adapter, load_module(args.module, args.cls))

        def forward(model, ids, mask):
            return model(ids, mask)
    peft_model = PeftModel.from_pretrained(base, str(args.adapter))
    peft_model.eval()
    lora_b = [(n, p) for n, p in peft_model.named_parameters() if "lora_B" in n]
    print(f"peft: {len(lora_b)} LoRA modules injected, sum |B| = "
          f"{sum(float(p.abs().sum()) for _, p in lora_b):.4f}")
    ids, mask = encode(args.base, seqs, args.max_length)
    with torch.no_grad():
        # The wrapped module: LoRA layers and the saved heads are injected in place, and calling
        # it directly avoids PeftModelForSequenceClassification's Hugging Face keyword arguments.
        logits = forward(peft_model.base_model.model, ids, mask).double()
    probs = torch.softmax(logits, dim=-1)
    theirs = dnatune_probs(exe, args.base, args.adapter, seqs, args.max_length)

    worst_p = worst_lo = 0.0
    print(f"{'seq':<4} {'peft logits':<28} {'peft probs':<24} {'dnatune probs':<24} d(log-odds)")
    for i, (lg, p, q) in enumerate(zip(logits.tolist(), probs.tolist(), theirs)):
        d_lo = max(abs((lg[c] - lg[0]) - (math.log(q[c]) - math.log(q[0]))) for c in range(len(q)))
        worst_p = max(worst_p, max(abs(a - b) for a, b in zip(p, q)))
        worst_lo = max(worst_lo, d_lo)
        fmt = lambda v: "[" + ", ".join(f"{x:+.6f}" for x in v) + "]"
        print(f"s{i:<3} {fmt(lg):<28} {fmt(p):<24} {fmt(q):<24} {d_lo:.2e}")
    print(f"max |prob difference| {worst_p:.2e}, max |log-odds difference| {worst_lo:.2e}")
    return 0 if worst_p <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
