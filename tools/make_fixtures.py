"""Writes the small model fixtures under tests/fixtures/ that dnatune's Rust tests compare against.

Run once by hand, from the repository root, with a private venv that has torch and transformers
(never needed in CI; the outputs are committed):

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch transformers safetensors numpy
    /work/venv-torch/bin/python tools/make_fixtures.py [FIXTURE ...]   # default: all

It writes, deterministically (fixed seeds, CPU):
  tests/fixtures/tiny-dnabert2/  DNABERT-2 architecture, 6 heads (not a power of two, so the ALiBi
                                 slope interleaving is exercised), from tools/torch_reference/dnabert2.py;
  tests/fixtures/tiny-bert/      classic BERT built by transformers.BertForSequenceClassification
                                 with a DNABERT 3-mer vocab.txt.
  tests/fixtures/nested-state-dict/  a pytorch_model.bin whose state dict is nested and prefixed;
  tests/fixtures/tiny-esm/       transformers.EsmForSequenceClassification in the Nucleotide Transformer
                                 v1 layout (learned positions, token dropout) with an NT 3-mer vocab.txt;
  tests/fixtures/tiny-nt-v2/     the same classes in the v2 layout (rotary, bias-free SwiGLU swapped in);
  tests/fixtures/tiny-nt-v2-mlm/ transformers.EsmForMaskedLM in the v2 layout with an untied decoder.
The model directories get config.json, model.safetensors, pytorch_model.bin (torch.save of the same
state_dict, zip format) and expected.json (inputs and float64 eval-mode logits rounded to float32).
Before writing, the DNABERT-2 reference is cross-checked against a plain loop-based numpy forward.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "torch_reference"))

from dnabert2 import DnaBert2ForSequenceClassification, alibi_slopes
from nt_v2 import use_swiglu

FIXTURES = ROOT / "tests" / "fixtures"

DNABERT2_CONFIG = {
    "_name_or_path": "dnatune/tiny-dnabert2",
    "alibi_starting_size": 512,
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_bert.BertConfig",
        "AutoModel": "bert_layers.BertModel",
        "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
        "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification",
    },
    "classifier_dropout": None,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 48,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "num_attention_heads": 6,
    "num_hidden_layers": 2,
    "num_labels": 2,
    # Present in the released DNABERT-2 config although the model has no position embeddings.
    "position_embedding_type": "absolute",
    "torch_dtype": "float32",
    "transformers_version": "4.28.0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 64,
}

# DNABERT-2 tokenizer ids: [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4.
DNABERT2_CLS, DNABERT2_SEP, DNABERT2_PAD = 1, 2, 3

# DNABERT k-mer vocab order: five specials, then k-mers in itertools.product order over "ATCG".
KMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def kmer_vocab(k: int) -> list[str]:
    return KMER_SPECIALS + ["".join(p) for p in itertools.product("ATCG", repeat=k)]


def write_vocab(directory: Path, vocab: list[str]) -> dict[str, int]:
    """Writes `vocab.txt` (one token per line, the line number is the id); returns token -> id."""
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return {t: i for i, t in enumerate(vocab)}


def pad_rows(rows: list[list[int]], pad: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right-pads token rows to the longest: (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    return [r + [pad] * (width - len(r)) for r in rows], [[1] * len(r) + [0] * (width - len(r)) for r in rows]


def perturb_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Draws every parameter away from its default so errors cannot hide in the fixture.

    Linear weights are N(0, 1/fan_in) rather than the usual N(0, 0.02): at this tiny width 0.02 makes
    every layer nearly the identity through its residual and the logits almost independent of the
    input (rows then differ only in the 4th decimal), which would let a wrong attention or MLP pass.
    Embeddings are N(0, 1) (they go straight into a LayerNorm), LayerNorm gains 1 + N(0, 0.2), and all
    biases, LayerNorm biases included, N(0, 0.1).
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            is_norm = "layernorm" in name.lower().replace("_", "")
            if is_norm and name.endswith("weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif "embeddings" in name:
                value = noise
            else:
                value = noise / math.sqrt(param.shape[1])
            param.copy_(value.to(param.dtype))


def round_f32(values: torch.Tensor) -> list:
    """float64 results rounded to float32, written as the shortest decimals that read back exactly."""
    return [[float(np.float32(v)) for v in row] for row in values.tolist()]


def write_expected(path: Path, fields: dict) -> None:
    """JSON with one matrix row per line: small to commit, easy to read in a diff."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = ",\n    ".join(json.dumps(row) for row in value)
            parts.append(f'  "{key}": [\n    {rows}\n  ]')
        else:
            parts.append(f'  "{key}": {json.dumps(value)}')
    path.write_text("{\n" + ",\n".join(parts) + "\n}\n")
    assert json.loads(path.read_text()) == fields


def save_weights(model: torch.nn.Module, directory: Path) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    torch.save(state, directory / "pytorch_model.bin")
    # Both files must hold the same tensors.
    from_st = load_file(str(directory / "model.safetensors"))
    from_bin = torch.load(directory / "pytorch_model.bin", weights_only=True)
    assert from_st.keys() == from_bin.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(from_st[key], value) and torch.equal(from_bin[key], value), key


def numpy_dnabert2_logits(state: dict, cfg: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A second, deliberately naive float64 forward (explicit loops over heads and positions)."""
    w = {k: v.detach().double().numpy() for k, v in state.items()}
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim, inter, eps = hidden // heads, cfg["intermediate_size"], cfg["layer_norm_eps"]
    slopes = alibi_slopes(heads)
    erf = np.vectorize(math.erf)

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def linear(x, prefix, bias=True):
        y = x @ w[prefix + ".weight"].T
        return y + w[prefix + ".bias"] if bias else y

    logits = []
    for b in range(ids.shape[0]):
        length = ids.shape[1]
        x = w["bert.embeddings.word_embeddings.weight"][ids[b]]
        x = x + w["bert.embeddings.token_type_embeddings.weight"][0]
        x = layer_norm(x, "bert.embeddings.LayerNorm")
        for layer in range(cfg["num_hidden_layers"]):
            p = f"bert.encoder.layer.{layer}."
            qkv = linear(x, p + "attention.self.Wqkv")
            context = np.zeros((length, hidden))
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                q = qkv[:, :hidden][:, cols]
                k = qkv[:, hidden : 2 * hidden][:, cols]
                v = qkv[:, 2 * hidden :][:, cols]
                for i in range(length):
                    scores = np.array(
                        [
                            q[i] @ k[j] / math.sqrt(head_dim)
                            - slopes[h] * abs(i - j)
                            + (1.0 - mask[b, j]) * -10000.0
                            for j in range(length)
                        ]
                    )
                    probs = np.exp(scores - scores.max())
                    probs /= probs.sum()
                    context[i, cols] = probs @ v
            x = layer_norm(
                linear(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm"
            )
            gated = linear(x, p + "mlp.gated_layers", bias=False)
            gate, value = gated[:, :inter], gated[:, inter:]
            act = 0.5 * gate * (1.0 + erf(gate / math.sqrt(2.0))) * value
            x = layer_norm(linear(act, p + "mlp.wo") + x, p + "mlp.layernorm")
        pooled = np.tanh(linear(x[0], "bert.pooler.dense"))
        logits.append(linear(pooled, "classifier"))
    return np.stack(logits)


def make_tiny_dnabert2() -> None:
    out = FIXTURES / "tiny-dnabert2"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(20240601)
    generator = torch.Generator().manual_seed(20240601)
    model = DnaBert2ForSequenceClassification(DNABERT2_CONFIG)
    perturb_(model, generator)
    model.eval()

    (out / "config.json").write_text(json.dumps(DNABERT2_CONFIG, indent=2, sort_keys=True) + "\n")
    save_weights(model, out)

    # Batch of 3 x 12: one full row, two right-padded rows with [PAD] = 3.
    lengths = [12, 9, 5]
    ids = torch.full((3, 12), DNABERT2_PAD, dtype=torch.long)
    mask = torch.zeros((3, 12), dtype=torch.long)
    for row, n in enumerate(lengths):
        body = torch.randint(5, DNABERT2_CONFIG["vocab_size"], (n - 2,), generator=generator)
        ids[row, :n] = torch.cat([torch.tensor([DNABERT2_CLS]), body, torch.tensor([DNABERT2_SEP])])
        mask[row, :n] = 1

    reloaded = DnaBert2ForSequenceClassification.from_pretrained(out).double()
    with torch.no_grad():
        logits = reloaded(ids, mask)
    naive = numpy_dnabert2_logits(reloaded.state_dict(), DNABERT2_CONFIG, ids.numpy(), mask.numpy())
    gap = np.abs(naive - logits.numpy()).max()
    assert gap < 1e-12, f"reference and naive numpy forward disagree by {gap}"

    # Sanity: padding must be invisible — row 1 alone, unpadded, gives the same logits.
    with torch.no_grad():
        alone = reloaded(ids[1:2, : lengths[1]], mask[1:2, : lengths[1]])
    assert torch.allclose(alone, logits[1:2], atol=1e-12), "padding leaks into the logits"

    expected = {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "logits": round_f32(logits),
        "alibi_slopes": alibi_slopes(DNABERT2_CONFIG["num_attention_heads"]),
    }
    write_expected(out / "expected.json", expected)
    print(f"tiny-dnabert2: logits {expected['logits']}")


def make_tiny_bert() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    out = FIXTURES / "tiny-bert"
    out.mkdir(parents=True, exist_ok=True)
    vocab = kmer_vocab(3)
    token = write_vocab(out, vocab)

    torch.manual_seed(20240602)
    generator = torch.Generator().manual_seed(20240602)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=2,
        pad_token_id=token["[PAD]"],
        layer_norm_eps=1e-12,
    )
    model = BertForSequenceClassification(config)
    perturb_(model, generator)
    model.eval()
    model.save_pretrained(out)
    torch.save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")
    from_st = load_file(str(out / "model.safetensors"))
    from_bin = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert from_st.keys() == from_bin.keys()
    assert all(torch.equal(from_st[k], from_bin[k]) for k in from_st)

    # Overlapping 3-mers of real sequences, [CLS] ... [SEP], right-padded with [PAD] to 10.
    sequences = ["ACGTTGCAAT", "GGATCCA"]
    ids, mask = [], []
    for seq in sequences:
        kmers = [seq[i : i + 3] for i in range(len(seq) - 2)]
        row = [token["[CLS]"]] + [token[k] for k in kmers] + [token["[SEP]"]]
        mask.append([1] * len(row) + [0] * (10 - len(row)))
        ids.append(row + [token["[PAD]"]] * (10 - len(row)))
    input_ids, attention_mask = torch.tensor(ids), torch.tensor(mask)

    reference = BertForSequenceClassification.from_pretrained(out).double().eval()
    with torch.no_grad():
        logits = reference(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).logits
    expected = {
        "sequences": sequences,
        "input_ids": ids,
        "attention_mask": mask,
        "logits": round_f32(logits),
    }
    write_expected(out / "expected.json", expected)
    print(f"tiny-bert: logits {expected['logits']}")


# Nucleotide Transformer vocabulary order: six specials, the k-mers (product order over "ACGT"),
# then the single bases for the stretches no k-mer covers (tails, N).
NT_SPECIALS = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]


def nt_vocab(k: int) -> list[str]:
    return NT_SPECIALS + ["".join(p) for p in itertools.product("ACGT", repeat=k)] + list("ACGTN")


def nt_ids(directory: Path, sequences: list[str]) -> list[list[int]]:
    """Ids from transformers' own EsmTokenizer on the vocab.txt in `directory`, without an end token
    as the released Nucleotide Transformer tokenizers (transformers#22770): <cls>, then the longest
    vocabulary match from the left (k-mers restart after an N)."""
    from transformers import EsmTokenizer

    tokenizer = EsmTokenizer(vocab_file=str(directory / "vocab.txt"), eos_token=None)
    return [tokenizer(seq)["input_ids"] for seq in sequences]


def make_tiny_esm(name: str, v2: bool, seed: int) -> None:
    """transformers' EsmForSequenceClassification in the Nucleotide Transformer layouts: v1
    (learned positions from pad_token_id + 1, GELU, token dropout on) or v2 (rotary positions,
    SwiGLU without biases: transformers' classes with tools/torch_reference/nt_v2.py's
    feed-forward modules swapped in)."""
    from transformers import EsmConfig, EsmForSequenceClassification

    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    k = 3
    vocab = nt_vocab(k)
    token = write_vocab(out, vocab)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = EsmConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=40,
        layer_norm_eps=1e-12,
        position_embedding_type="rotary" if v2 else "absolute",
        token_dropout=not v2,
        emb_layer_norm_before=False,
        pad_token_id=token["<pad>"],
        mask_token_id=token["<mask>"],
        num_labels=2,
    )
    model = EsmForSequenceClassification(config)
    if v2:
        use_swiglu(model, hidden=32, intermediate=48, bias=False, dropout=0.0)
    perturb_(model, generator)
    model.eval()
    save_weights(model, out)
    raw = config.to_dict()
    if v2:
        # As the released v2 checkpoints: their own code in auto_map, no model_type.
        raw["add_bias_fnn"] = False
        raw.pop("model_type", None)
        raw["auto_map"] = {
            "AutoConfig": "esm_config.EsmConfig",
            "AutoModelForMaskedLM": "modeling_esm.EsmForMaskedLM",
        }
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")

    # Three right-padded rows; v1's second row holds a <mask>, which token dropout zeroes and
    # compensates for.
    sequences = ["ACGTTGCAATGGA", "GGATCCANTAC", "TTGACG"]
    rows = nt_ids(out, sequences)
    if not v2:
        rows[1][2] = token["<mask>"]
    ids, mask = pad_rows(rows, token["<pad>"])
    input_ids, attention_mask = torch.tensor(ids), torch.tensor(mask)

    reference = model.double()
    with torch.no_grad():
        logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        alone = reference(input_ids=input_ids[2:, : len(rows[2])]).logits
    assert torch.allclose(alone, logits[2:], atol=1e-10), "padding leaks into the logits"
    expected = {
        "sequences": sequences,
        "input_ids": ids,
        "attention_mask": mask,
        "logits": round_f32(logits),
    }
    write_expected(out / "expected.json", expected)
    print(f"{name}: logits {expected['logits']}")


def make_tiny_nt_v2_mlm() -> None:
    """transformers' EsmForMaskedLM in the v2 layout with an untied decoder (as the released v2
    checkpoints: `tie_word_embeddings: false`), and its vocabulary logits at every position."""
    from transformers import EsmConfig, EsmForMaskedLM

    out = FIXTURES / "tiny-nt-v2-mlm"
    out.mkdir(parents=True, exist_ok=True)
    vocab = nt_vocab(3)
    token = write_vocab(out, vocab)
    torch.manual_seed(20240605)
    generator = torch.Generator().manual_seed(20240605)
    config = EsmConfig(
        vocab_size=len(vocab), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=40, layer_norm_eps=1e-12, position_embedding_type="rotary",
        token_dropout=False, emb_layer_norm_before=False, pad_token_id=token["<pad>"],
        mask_token_id=token["<mask>"], tie_word_embeddings=False,
    )
    model = EsmForMaskedLM(config)
    use_swiglu(model, hidden=24, intermediate=40, bias=False, dropout=0.0)
    perturb_(model, generator)
    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    assert "lm_head.decoder.weight" in state and not torch.equal(
        state["lm_head.decoder.weight"], state["esm.embeddings.word_embeddings.weight"]
    ), "the decoder must be untied"
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = config.to_dict()
    raw["add_bias_fnn"] = False
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")

    sequences = ["ACGTTGCAATGGA", "GGATCCATAC"]
    rows = nt_ids(out, sequences)
    rows[0][2] = token["<mask>"]
    ids, mask = pad_rows(rows, token["<pad>"])
    with torch.no_grad():
        logits = model.double()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    # Real (unpadded) positions only, row by row: (tokens, vocab).
    real = torch.cat([logits[b, : len(r)] for b, r in enumerate(rows)])
    expected = {"input_ids": ids, "attention_mask": mask, "logits": round_f32(real)}
    write_expected(out / "expected.json", expected)
    print(f"tiny-nt-v2-mlm: {real.shape[0]} x {real.shape[1]} logits")


def make_nested_checkpoint() -> None:
    """A training-script checkpoint: the state dict nested under "state_dict", DataParallel's
    "module." prefix, an f16 tensor and an int64 buffer. Values are exact in f16 so tests can
    compare them literally: weight[i][j] = (4 i + j) / 8, position_ids = 0..4."""
    out = FIXTURES / "nested-state-dict"
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "module.bert.embeddings.word_embeddings.weight": (torch.arange(12.0) / 8).reshape(3, 4).half(),
        "module.bert.embeddings.position_ids": torch.arange(5, dtype=torch.int64),
    }
    torch.save({"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.001}}, out / "pytorch_model.bin")


FIXTURE_MAKERS = {
    "tiny-dnabert2": make_tiny_dnabert2,
    "tiny-bert": make_tiny_bert,
    "nested-state-dict": make_nested_checkpoint,
    "tiny-esm": lambda: make_tiny_esm("tiny-esm", v2=False, seed=20240603),
    "tiny-nt-v2": lambda: make_tiny_esm("tiny-nt-v2", v2=True, seed=20240604),
    "tiny-nt-v2-mlm": make_tiny_nt_v2_mlm,
}


def main() -> None:
    """Writes the fixtures named on the command line, or all of them."""
    torch.use_deterministic_algorithms(True)
    for name in sys.argv[1:] or FIXTURE_MAKERS:
        FIXTURE_MAKERS[name]()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
