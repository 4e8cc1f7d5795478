"""Masked-language-model pre-training of the DNABERT-2 architecture with PyTorch.

Produces dnatune's shipped small base model (models/dnatune-dnabert2-small). It reuses the independent
reference encoder in tools/torch_reference/dnabert2.py and adds DNABERT-2's MLM head:

    cls.predictions.transform.dense.{weight,bias} -> exact GELU
    -> cls.predictions.transform.LayerNorm.{weight,bias} (eps 1e-12)
    -> decoder: weight TIED to bert.embeddings.word_embeddings.weight, plus cls.predictions.decoder.bias

Data. Every corpus sequence is upper-cased and split at runs of N; pieces shorter than 10 bases are
dropped. A fixed 1 % of the *sequences* (seeded permutation) is held out for validation. Pieces are
tokenized without special tokens and each is followed by [SEP]. Each epoch shuffles the training
pieces, concatenates them into one stream, starts it at a random offset and cuts it into windows of
``seq_len - 1`` tokens, each prefixed with [CLS]: ``[CLS] ...a [SEP] b [SEP] c...``. So short
sequences (most are 60-70 bp) share a window RoBERTa-style (attention is not blocked between them)
and long ones are cut at random places, a different crop every epoch; no window has padding.

Masking (BERT / DNABERT-2): each non-special token is chosen with probability 0.15 (never
[UNK]/[CLS]/[SEP]/[PAD]/[MASK]); a chosen token becomes [MASK] (80 %), a random ordinary token,
id >= 5 (10 %), or stays (10 %); the loss is cross-entropy on the chosen positions only. The head runs
only on up to ``k_max`` chosen positions per window (static shapes, no host sync); ``k_max`` sits
seven standard deviations above the mean count, and any window that would exceed it is counted and
reported (it then simply has fewer masked tokens).

Optimisation: BERT-style init (normal(0, 0.02) weights and embeddings, zero biases, LayerNorm 1/0),
AdamW without decay on biases and LayerNorm, gradient clipping at 1.0, linear warm-up then linear
decay to zero over a WALL-CLOCK budget (``--minutes`` covers the whole script, data preparation and
saving included, so a run ends cleanly inside a time-limited job), bf16 autocast and TF32 on CUDA.

Outputs in ``--out``: config.json (the layout ``dnatune init-model`` writes), tokenizer.json,
model.safetensors (float16: every bert.* tensor incl. the pooler, which MLM leaves at its init, and
the MLM head without the tied decoder weight), log.jsonl, summary.json and, with
``--fp32-checkpoint``, the float32 weights in two shards (each under 16 MiB) for ``--init-from``.

Usage:
    python tools/pretrain_torch.py train --out OUT --minutes 8.5
    python tools/pretrain_torch.py train --out OUT2 --minutes 8 --init-from OUT --warmup-frac 0.02
    python tools/pretrain_torch.py plot --log log.jsonl --svg loss.svg
"""

from __future__ import annotations

import time

SCRIPT_START = time.perf_counter()  # before the heavy imports: --minutes counts them too

import argparse
import gzip
import hashlib
import json
import math
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "torch_reference"))

from dnabert2 import DnaBert2Config, DnaBert2Model, alibi_bias

UNK_ID, CLS_ID, SEP_ID, PAD_ID, MASK_ID = 0, 1, 2, 3, 4
FIRST_ORDINARY_ID = 5
MIN_PIECE_BASES = 10
VAL_FRACTION = 0.01
MASK_PROB = 0.15


def dnabert2_config(layers: int, hidden: int, heads: int, intermediate: int, vocab: int) -> dict:
    """The config.json fields, in the layout `dnatune init-model --arch dnabert2` writes."""
    return {
        "alibi_starting_size": 512,
        "architectures": ["BertForMaskedLM"],
        "attention_probs_dropout_prob": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_bert.BertConfig",
            "AutoModel": "bert_layers.BertModel",
            "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
            "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification",
        },
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "type_vocab_size": 2,
        "vocab_size": vocab,
    }


# ----------------------------------------------------------------------------------------- model


class PredictionTransform(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x), approximate="none"))


class TiedDecoder(nn.Module):
    """Holds only the decoder bias; its weight is the word-embedding matrix (weight tying)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))


class Predictions(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = TiedDecoder(cfg.vocab_size)


class MlmHead(nn.Module):
    def __init__(self, cfg: DnaBert2Config):
        super().__init__()
        self.predictions = Predictions(cfg)


def sdpa_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The reference ``Attention.forward`` through fused scaled-dot-product attention.

    Same weights, same maths (scale 1/sqrt(head_dim), additive ALiBi bias, softmax, output dense,
    dropout, residual, post-LayerNorm); ``check_sdpa_matches_reference`` verifies it in float32.
    """
    batch, length, _ = x.shape
    heads, head_dim = attn.cfg.num_attention_heads, attn.cfg.head_dim
    qkv = attn.self.Wqkv(x).view(batch, length, 3, heads, head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    p = attn.probs_dropout.p if attn.training else 0.0
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p)
    context = context.transpose(1, 2).reshape(batch, length, heads * head_dim)
    return attn.output(context, x)


class DnaBert2ForMaskedLM(nn.Module):
    """Reference encoder + DNABERT-2 MLM head; state_dict keys match the released checkpoints."""

    def __init__(self, config: dict):
        super().__init__()
        self.cfg = DnaBert2Config(config)
        self.bert = DnaBert2Model(self.cfg)
        self.cls = MlmHead(self.cfg)
        self._bias_cache: dict = {}

    def alibi(self, length: int, device: torch.device) -> torch.Tensor:
        """ALiBi bias [1, heads, len, len], kept on the device (the reference rebuilds it on the host)."""
        key = (length, str(device))
        if key not in self._bias_cache:
            bias = alibi_bias(self.cfg.num_attention_heads, length)[None]
            self._bias_cache[key] = bias.to(device)
        return self._bias_cache[key]

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Sequence output for unpadded windows (pre-training windows never hold padding)."""
        x = self.bert.embeddings(input_ids, None)
        bias = self.alibi(input_ids.shape[1], input_ids.device)
        for layer in self.bert.encoder.layer:
            x = layer.mlp(sdpa_attention(layer.attention, x, bias))
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [batch, k, vocab] at ``positions`` [batch, k] only (the masked ones)."""
        hidden = self.encode(input_ids)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        t = self.cls.predictions.transform(picked)
        word = self.bert.embeddings.word_embeddings.weight
        return F.linear(t, word, self.cls.predictions.decoder.bias)


def bert_init_(model: nn.Module, std: float) -> None:
    """BERT initialisation: normal(0, std) for linear and embedding weights, zero biases, LayerNorm 1/0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, TiedDecoder):
                module.bias.zero_()


def check_sdpa_matches_reference(config: dict) -> float:
    """Float32 CPU check that the SDPA encoder equals the reference ``DnaBert2Model`` forward."""
    gen = torch.Generator().manual_seed(1234)
    model = DnaBert2ForMaskedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # O(1) weights so differences cannot hide behind tiny values
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        ids = torch.randint(FIRST_ORDINARY_ID, config["vocab_size"], (3, 40), generator=gen)
        ours = model.encode(ids)
        ref, _ = model.bert(ids)
    err = ((ours - ref).norm() / ref.norm()).item()
    if not err < 1e-5:
        raise SystemExit(f"SDPA encoder differs from the reference: relative error {err:.3g}")
    return err


# ------------------------------------------------------------------------------------------ data


def read_fasta_gz(path: Path) -> list[str]:
    sequences, current = [], []
    with gzip.open(path, "rt") as handle:
        for line_no, line in enumerate(handle, 1):
            line = line.strip()
            if line.startswith(">"):
                if current:
                    sequences.append("".join(current))
                current = []
            elif line:
                if not sequences and not current and line_no == 1:
                    raise SystemExit(f"{path}:1: expected a FASTA header ('>')")
                current.append(line)
    if current:
        sequences.append("".join(current))
    return sequences


def split_at_n(sequence: str) -> list[str]:
    """Upper-cases and cuts at every run of N; drops pieces too short to teach anything."""
    return [p for p in sequence.upper().split("N") if len(p) >= MIN_PIECE_BASES]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenize_corpus(corpus: Path, tokenizer: Path, cache: Path | None) -> dict:
    """Token ids of every corpus piece, with the sequence each piece came from.

    Cached as .npz keyed by the corpus and tokenizer hashes, so a machine without the `tokenizers`
    package (or a second run) can reuse it.
    """
    key = sha256_of(corpus) + ":" + sha256_of(tokenizer)
    if cache is not None and cache.exists():
        data = dict(np.load(cache))
        if str(data["key"]) != key:
            raise SystemExit(f"{cache}: token cache was made from another corpus or tokenizer")
        return data
    from tokenizers import Tokenizer

    sequences = read_fasta_gz(corpus)
    pieces, owner = [], []
    for index, sequence in enumerate(sequences):
        for piece in split_at_n(sequence):
            pieces.append(piece)
            owner.append(index)
    tok = Tokenizer.from_file(str(tokenizer))
    encoded = tok.encode_batch(pieces, add_special_tokens=False)
    lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
    ids = np.fromiter((i for e in encoded for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
    if ids.max() >= tok.get_vocab_size() or (ids < FIRST_ORDINARY_ID).any():
        bad = int((ids < FIRST_ORDINARY_ID).sum())
        raise SystemExit(f"{corpus}: {bad} tokens are special ids ([UNK]?) after splitting at N")
    data = {
        "key": np.array(key),
        "ids": ids.astype(np.uint16),
        "lengths": lengths.astype(np.int32),
        "owner": np.array(owner, dtype=np.int32),
        "n_sequences": np.array(len(sequences)),
        "bases": np.array(sum(len(p) for p in pieces)),
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **data)
    return data


def split_train_val(data: dict, seed: int) -> tuple[dict, dict]:
    """Holds out a fixed 1 % of the sequences (all pieces of a held-out sequence go together)."""
    n_seq = int(data["n_sequences"])
    held = np.zeros(n_seq, dtype=bool)
    n_val = max(1, round(n_seq * VAL_FRACTION))
    held[np.random.default_rng(seed).permutation(n_seq)[:n_val]] = True
    lengths = data["lengths"].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    is_val = held[data["owner"]]
    ids = data["ids"].astype(np.int64)
    out = []
    for select in (~is_val, is_val):
        idx = np.flatnonzero(select)
        # Each piece followed by [SEP]: piece lengths grow by one.
        chunks = []
        for s, n in zip(starts[idx], lengths[idx]):
            chunks.append(ids[s : s + n])
            chunks.append(np.array([SEP_ID]))
        stream = np.concatenate(chunks)
        out.append({"stream": stream, "lengths": lengths[idx] + 1, "pieces": len(idx)})
    out[0]["sequences"] = int((~held).sum())
    out[1]["sequences"] = int(held.sum())
    return out[0], out[1]


def windows_from_stream(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cuts a token stream into [CLS]-prefixed windows of seq_len tokens (dropping the remainder)."""
    body = seq_len - 1
    n = stream.numel() // body
    cls = torch.full((n, 1), CLS_ID, dtype=stream.dtype, device=stream.device)
    return torch.cat([cls, stream[: n * body].view(n, body)], dim=1)


class EpochSampler:
    """Yields batches of windows; each epoch reshuffles the pieces and re-cuts the windows."""

    def __init__(self, split: dict, seq_len: int, batch: int, device: torch.device, seed: int):
        self.stream = torch.from_numpy(split["stream"]).to(device)
        self.lengths = torch.from_numpy(split["lengths"]).to(device)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        self.seq_len, self.batch, self.device = seq_len, batch, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.epoch, self.windows, self.cursor = 0, None, 0

    def _new_epoch(self) -> None:
        n = self.lengths.numel()
        perm = torch.randperm(n, generator=self.gen, device=self.device)
        lens, starts = self.lengths[perm], self.offsets[perm]
        out_starts = torch.cumsum(lens, 0) - lens
        total = self.stream.numel()
        shift = torch.repeat_interleave(starts - out_starts, lens, output_size=total)
        shuffled = self.stream[shift + torch.arange(total, device=self.device)]
        offset = int(torch.randint(self.seq_len - 1, (1,), generator=self.gen, device=self.device))
        windows = windows_from_stream(shuffled[offset:], self.seq_len)
        order = torch.randperm(windows.shape[0], generator=self.gen, device=self.device)
        self.windows, self.cursor = windows[order], 0
        self.epoch += 1

    def next(self) -> torch.Tensor:
        if self.windows is None or self.cursor + self.batch > self.windows.shape[0]:
            self._new_epoch()
        batch = self.windows[self.cursor : self.cursor + self.batch]
        self.cursor += self.batch
        return batch


def mask_batch(ids: torch.Tensor, gen: torch.Generator, k_max: int, vocab: int):
    """BERT masking with a static number of scored slots per window.

    Returns (corrupted inputs, positions [B, k_max], labels [B, k_max] with -100 for unused slots,
    number of windows whose chosen count exceeded k_max).
    """
    b, length = ids.shape
    dev = ids.device
    special = ids < FIRST_ORDINARY_ID
    chosen_all = (torch.rand(b, length, generator=gen, device=dev) < MASK_PROB) & ~special
    # Chosen positions first (score >= 2), ties and fillers in random order.
    score = chosen_all.float() * 2 + torch.rand(b, length, generator=gen, device=dev)
    positions = score.topk(k_max, dim=1).indices
    chosen = chosen_all.gather(1, positions)
    original = ids.gather(1, positions)
    labels = torch.where(chosen, original, torch.full_like(original, -100))
    u = torch.rand(b, k_max, generator=gen, device=dev)
    random_tok = torch.randint(FIRST_ORDINARY_ID, vocab, (b, k_max), generator=gen, device=dev)
    replaced = torch.where(u < 0.8, torch.full_like(original, MASK_ID), random_tok)
    replaced = torch.where(u < 0.9, replaced, original)
    inputs = ids.scatter(1, positions, torch.where(chosen, replaced, original))
    overflow = (chosen_all.sum(1) > k_max).sum()
    return inputs, positions, labels, overflow


def k_max_for(seq_len: int) -> int:
    mean = MASK_PROB * seq_len
    return min(seq_len, math.ceil(mean + 7 * math.sqrt(mean * (1 - MASK_PROB))))


# ------------------------------------------------------------------------------------ checkpoint


def load_weights(model: DnaBert2ForMaskedLM, directory: Path) -> str:
    """Loads float32 shards when present (exact continuation), else model.safetensors."""
    from safetensors.torch import load_file

    shards = sorted(directory.glob("fp32-weights-*.safetensors"))
    files = shards or [directory / "model.safetensors"]
    state = {}
    for f in files:
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    model.load_state_dict(state, strict=True)
    return ", ".join(f.name for f in files)


def save_model_dir(
    model: DnaBert2ForMaskedLM, config: dict, tokenizer: Path, out: Path, fp32: bool
):
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    half = {k: v.half() for k, v in state.items()}
    for k, v in half.items():
        if not torch.isfinite(v).all():
            raise SystemExit(f"{k} does not fit in float16")
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer.resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    if fp32:
        # Two shards, each under the 16 MiB a result file may have.
        keys, total, shard0 = list(state), sum(v.numel() for v in state.values()), {}
        for k in keys:
            if sum(v.numel() for v in shard0.values()) * 2 >= total:
                break
            shard0[k] = state[k]
        shard1 = {k: v for k, v in state.items() if k not in shard0}
        save_file(shard0, str(out / "fp32-weights-0.safetensors"), metadata={"format": "pt"})
        save_file(shard1, str(out / "fp32-weights-1.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------- train


@torch.no_grad()
def evaluate(model, val_batches) -> tuple[float, float]:
    """Mean MLM cross-entropy and masked-token accuracy over the fixed validation set."""
    model.eval()
    loss_sum = torch.zeros((), device=val_batches[0][0].device)
    correct = torch.zeros((), device=loss_sum.device)
    count = torch.zeros((), device=loss_sum.device)
    for inputs, positions, labels in val_batches:
        with autocast(inputs.device):
            logits = model(inputs, positions).float()
        flat_labels = labels.view(-1)
        loss_sum += F.cross_entropy(
            logits.view(-1, logits.shape[-1]), flat_labels, ignore_index=-100, reduction="sum"
        )
        valid = flat_labels != -100
        correct += ((logits.view(-1, logits.shape[-1]).argmax(-1) == flat_labels) & valid).sum()
        count += valid.sum()
    model.train()
    return (loss_sum / count).item(), (correct / count).item()


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def lr_at(frac: float, peak: float, warmup: float) -> float:
    if frac < warmup:
        return peak * frac / warmup
    return peak * max(0.0, 1.0 - frac) / (1.0 - warmup)


def train(args) -> None:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    log_path.write_text("")

    def log(record: dict) -> None:
        """Appends one JSON line (reopened each time, so a killed run keeps everything logged)."""
        record["elapsed_s"] = round(time.perf_counter() - SCRIPT_START, 2)
        with open(log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    vocab = json.loads(Path(args.tokenizer).read_text())
    vocab_size = len(vocab["model"]["vocab"]) + sum(
        1 for t in vocab.get("added_tokens", []) if t["content"] not in vocab["model"]["vocab"]
    )
    config = dnabert2_config(args.layers, args.hidden, args.heads, args.intermediate, vocab_size)
    sdpa_err = check_sdpa_matches_reference(dnabert2_config(2, 48, 6, 96, 64))

    data = tokenize_corpus(
        Path(args.corpus),
        Path(args.tokenizer),
        Path(args.token_cache) if args.token_cache else None,
    )
    train_split, val_split = split_train_val(data, args.split_seed)

    torch.manual_seed(args.seed)
    model = DnaBert2ForMaskedLM(config)
    bert_init_(model, config["initializer_range"])
    previous: dict = {}
    loaded_from = None
    if args.init_from:
        loaded_from = load_weights(model, Path(args.init_from))
        summary_path = Path(args.init_from) / "summary.json"
        if summary_path.exists():
            previous = json.loads(summary_path.read_text())
    # A continued run draws fresh data order and masks rather than replaying the first run's.
    seed = args.seed + len(previous.get("runs", []))
    torch.manual_seed(seed)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())

    k_max = k_max_for(args.seq_len)
    val_gen = torch.Generator().manual_seed(args.val_mask_seed)
    val_windows = windows_from_stream(torch.from_numpy(val_split["stream"]), args.seq_len)
    if args.max_val_windows:
        val_windows = val_windows[: args.max_val_windows]
    val_inputs, val_pos, val_labels, _ = mask_batch(val_windows, val_gen, k_max, vocab_size)
    val_batches = [
        (
            val_inputs[i : i + args.batch_size].to(device),
            val_pos[i : i + args.batch_size].to(device),
            val_labels[i : i + args.batch_size].to(device),
        )
        for i in range(0, val_windows.shape[0], args.batch_size)
    ]
    sampler = EpochSampler(train_split, args.seq_len, args.batch_size, device, seed)
    mask_gen = torch.Generator(device=device).manual_seed(seed + 1)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=0.0,
        betas=(0.9, args.beta2),
        eps=args.adam_eps,
        fused=device.type == "cuda",
    )

    step0 = int(previous.get("steps", 0))
    tokens0 = int(previous.get("tokens_seen", 0))
    gpu = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    log(
        {
            "kind": "start",
            "device": gpu,
            "torch": torch.__version__,
            "params": n_params,
            "continued_from": loaded_from
            and {
                "dir": args.init_from,
                "files": loaded_from,
                "steps": step0,
                "tokens_seen": tokens0,
            },
            "train_sequences": train_split["sequences"],
            "train_pieces": train_split["pieces"],
            "train_tokens": int(train_split["stream"].size),
            "val_sequences": val_split["sequences"],
            "val_windows": int(val_windows.shape[0]),
            "val_masked_tokens": int((val_labels != -100).sum()),
            "k_max": k_max,
            "sdpa_check_rel_err": sdpa_err,
            "args": vars(args),
        }
    )

    deadline = SCRIPT_START + args.minutes * 60.0 - args.reserve_s
    train_start = time.perf_counter()
    budget = deadline - train_start
    if budget <= 0:
        raise SystemExit(f"--minutes {args.minutes} leaves no time to train after data preparation")
    val_loss, val_acc = evaluate(model, val_batches)
    log({"kind": "val", "step": step0, "tokens": tokens0, "val_loss": val_loss, "val_acc": val_acc})
    first_val = (val_loss, val_acc)
    last_eval = time.perf_counter()
    step, tokens_per_step = 0, args.batch_size * args.seq_len
    loss_acc = torch.zeros((), device=device)
    overflow_acc = torch.zeros((), dtype=torch.long, device=device)
    last_log_time, last_log_step = time.perf_counter(), 0
    lr = 0.0
    while True:
        now = time.perf_counter()
        frac = (now - train_start) / budget
        if frac >= 1.0:
            break
        lr = lr_at(frac, args.lr, args.warmup_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        inputs, positions, labels, overflow = mask_batch(
            sampler.next(), mask_gen, k_max, vocab_size
        )
        with autocast(device):
            logits = model(inputs, positions)
            loss = F.cross_entropy(
                logits.float().view(-1, vocab_size), labels.view(-1), ignore_index=-100
            )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_acc += loss.detach()
        overflow_acc += overflow
        step += 1
        if step % args.log_every == 0:
            mean_loss = (loss_acc / (step - last_log_step)).item()
            if not math.isfinite(mean_loss):
                raise SystemExit(f"training loss became {mean_loss} at step {step0 + step}")
            t = time.perf_counter()
            log(
                {
                    "kind": "train",
                    "step": step0 + step,
                    "tokens": tokens0 + step * tokens_per_step,
                    "loss": round(mean_loss, 5),
                    "lr": lr,
                    "grad_norm": round(grad_norm.item(), 4),
                    "epoch": sampler.epoch,
                    "tokens_per_s": round(
                        (step - last_log_step) * tokens_per_step / (t - last_log_time)
                    ),
                }
            )
            loss_acc.zero_()
            last_log_time, last_log_step = t, step
        if time.perf_counter() - last_eval >= args.eval_every_s:
            val_loss, val_acc = evaluate(model, val_batches)
            log(
                {
                    "kind": "val",
                    "step": step0 + step,
                    "tokens": tokens0 + step * tokens_per_step,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                }
            )
            last_eval = time.perf_counter()
            last_log_time = last_eval  # keep evaluation time out of the throughput figure
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_wall = time.perf_counter() - train_start
    val_loss, val_acc = evaluate(model, val_batches)
    log(
        {
            "kind": "val",
            "step": step0 + step,
            "tokens": tokens0 + step * tokens_per_step,
            "val_loss": val_loss,
            "val_acc": val_acc,
        }
    )
    save_model_dir(model, config, Path(args.tokenizer), out, args.fp32_checkpoint)
    this_run = {
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "train_wall_s": round(train_wall, 2),
        "tokens_per_s": round(step * tokens_per_step / train_wall),
        "epochs_started": sampler.epoch,
        "first_val_loss": first_val[0],
        "first_val_acc": first_val[1],
        "final_val_loss": val_loss,
        "final_val_acc": val_acc,
        "final_lr": lr,
        "masking_overflow_windows": int(overflow_acc.item()),
        "peak_lr": args.lr,
        "warmup_frac": args.warmup_frac,
        "seed": seed,
        "continued_from": args.init_from,
    }
    summary = {
        "steps": step0 + step,
        "tokens_seen": tokens0 + step * tokens_per_step,
        "final_val_loss": val_loss,
        "final_val_acc": val_acc,
        "runs": previous.get("runs", []) + [this_run],
        "script_wall_s": round(time.perf_counter() - SCRIPT_START, 2),
        "device": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "parameters": n_params,
        "config": config,
        "corpus": {
            "file": Path(args.corpus).name,
            "sha256": str(data["key"]).split(":")[0],
            "sequences": int(data["n_sequences"]),
            "bases": int(data["bases"]),
            "train_sequences": train_split["sequences"],
            "val_sequences": val_split["sequences"],
            "train_tokens_with_sep": int(train_split["stream"].size),
            "val_windows": int(val_windows.shape[0]),
        },
        "args": vars(args),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        {
            "kind": "end",
            **{k: summary[k] for k in ("steps", "tokens_seen", "final_val_loss", "final_val_acc")},
            "train_wall_s": round(train_wall, 2),
            "tokens_per_s": this_run["tokens_per_s"],
        }
    )


# ------------------------------------------------------------------------------------------ plot


def plot(args) -> None:
    """Draws train and validation MLM loss against tokens seen as a dependency-free SVG."""
    records = [
        json.loads(line)
        for path in args.log
        for line in Path(path).read_text().splitlines()
        if line
    ]
    train_pts = [(r["tokens"], r["loss"]) for r in records if r["kind"] == "train"]
    val_pts = [(r["tokens"], r["val_loss"]) for r in records if r["kind"] == "val"]
    restarts = [
        r["continued_from"]["tokens_seen"]
        for r in records
        if r["kind"] == "start" and r["continued_from"]
    ]
    if not train_pts:
        raise SystemExit(f"{args.log}: no training records")
    w, h, left, right, top, bottom = 640, 360, 60, 20, 30, 45
    xs = [x for x, _ in train_pts + val_pts]
    ys = [y for _, y in train_pts + val_pts]
    x_max = max(xs)
    y_lo, y_hi = math.floor(min(ys) * 2) / 2, math.ceil(max(ys) * 2) / 2

    def sx(x: float) -> float:
        return left + (w - left - right) * x / x_max

    def sy(y: float) -> float:
        return top + (h - top - bottom) * (y_hi - y) / (y_hi - y_lo)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{args.title}</text>',
    ]
    for i in range(round((y_hi - y_lo) / 0.5) + 1):
        y = y_lo + 0.5 * i
        parts.append(
            f'<line x1="{left}" x2="{w - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>'
        )
        parts.append(f'<text x="{left - 5}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for i in range(6):
        x = x_max * i / 5
        parts.append(
            f'<text x="{sx(x):.1f}" y="{h - bottom + 15}" text-anchor="middle">{x / 1e9:.2f}</text>'
        )
    parts.append(
        f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">tokens seen (billions)</text>'
    )
    parts.append(
        f'<text x="14" y="{(top + h - bottom) / 2}" transform="rotate(-90 14 {(top + h - bottom) / 2})" '
        'text-anchor="middle">MLM loss (nats)</text>'
    )
    for x in restarts:
        parts.append(
            f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{h - bottom}" stroke="#999" stroke-dasharray="4 3"/>'
        )
    for pts, colour, label, dy in (
        (train_pts, "#1f77b4", "train", 0),
        (val_pts, "#d62728", "validation", 16),
    ):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>'
        )
        parts.append(
            f'<line x1="{w - 150}" x2="{w - 130}" y1="{top + 10 + dy}" y2="{top + 10 + dy}" stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{w - 125}" y="{top + 14 + dy}">{label}</text>')
    parts.append(
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" fill="none" stroke="#444"/>'
    )
    parts.append("</svg>")
    Path(args.svg).write_text("\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pre-train with masked language modelling")
    t.add_argument(
        "--corpus", default=str(ROOT / "data/pretrain-corpus/gue-nontf-sequences.dedup.fa.gz")
    )
    t.add_argument(
        "--tokenizer", default=str(ROOT / "assets/tokenizers/dna-bpe-4096/tokenizer.json")
    )
    t.add_argument("--token-cache", help=".npz of the tokenized corpus (made when absent)")
    t.add_argument("--out", required=True)
    t.add_argument(
        "--minutes", type=float, required=True, help="wall-clock budget of the whole script"
    )
    t.add_argument(
        "--reserve-s",
        type=float,
        default=12.0,
        help="seconds kept for the final evaluation and saving",
    )
    t.add_argument("--init-from", help="model directory to continue from (fp32 shards preferred)")
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--intermediate", type=int, default=1024)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup-frac", type=float, default=0.05)
    t.add_argument("--beta2", type=float, default=0.98)
    t.add_argument("--adam-eps", type=float, default=1e-6)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--eval-every-s", type=float, default=30.0)
    t.add_argument(
        "--max-val-windows", type=int, default=0, help="0: all (a smaller set for CPU smoke tests)"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--split-seed", type=int, default=0)
    t.add_argument("--val-mask-seed", type=int, default=12345)
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument(
        "--fp32-checkpoint", action="store_true", help="also write float32 weight shards"
    )
    p = sub.add_parser("plot", help="draw loss.svg from one or more log.jsonl files")
    p.add_argument("--log", nargs="+", required=True)
    p.add_argument("--svg", required=True)
    p.add_argument("--title", default="dnatune-dnabert2-small: masked-language-model loss")
    args = parser.parse_args()
    train(args) if args.command == "train" else plot(args)


if __name__ == "__main__":
    main()
