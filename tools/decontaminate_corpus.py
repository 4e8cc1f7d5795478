"""Drops from the pre-training corpus every sequence that overlaps a GUE transcription-factor task.

Why: dnatune's benchmark is GUE's TF-binding tasks, and its shipped base model is pre-trained on a
corpus cut from the same genomes. A corpus sequence that contains a task window would let the base
model see the bases of dev/test windows before fine-tuning: the benchmark would not be clean.

Two criteria, both on either strand (a task sequence and its reverse complement):

* whole:  the corpus sequence contains a whole task sequence (all GUE TF windows are 101 bp);
* shared-k (default k = 50): the corpus sequence shares an exact substring of at least k bases
  with a task sequence, i.e. some k-mer of the corpus sequence is a k-mer of a task sequence or of
  its reverse complement. Every "whole" hit is also a shared-k hit (task windows are longer than k).

Sequences failing the chosen criterion (``--criterion``, default shared-k) are dropped; the rest are
written unchanged, in their original order and with their original headers, one line per sequence,
to a gzip FASTA with a zero time stamp (so the output bytes depend only on the input). Counts per
task and split go to stdout as JSON.

Method: the forward-strand k-mers of every task sequence go into one dict (k-mer -> bit mask of the
task/split files it occurs in); each corpus sequence and its reverse complement are scanned at every
offset against it, which is the same as matching the task strands against the corpus strand. Only
sequences with a k-mer hit are then searched for whole task sequences (dict of 101-mers).

Standard library only:
    python tools/decontaminate_corpus.py --corpus IN.fa.gz --gue DIR --out OUT.fa.gz
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
from pathlib import Path

TASKS = ("tf/0", "tf/1", "tf/2", "mouse/0", "mouse/2", "mouse/4")
SPLITS = ("train", "dev", "test")
COMPLEMENT = bytes.maketrans(b"ACGTN", b"TGCAN")


def reverse_complement(seq: bytes) -> bytes:
    return seq.translate(COMPLEMENT)[::-1]


def read_task(path: Path) -> list[bytes]:
    """Upper-cased sequences of a GUE csv (header ``sequence,label``); bad rows stop the run."""
    out = []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or header[:1] != ["sequence"]:
            sys.exit(f"{path}:1: expected a header starting with 'sequence', found {header!r}")
        for line_no, row in enumerate(reader, 2):
            if not row or not row[0]:
                sys.exit(f"{path}:{line_no}: empty sequence")
            seq = row[0].strip().upper().encode("ascii")
            if seq.translate(None, b"ACGTN"):
                sys.exit(f"{path}:{line_no}: sequence has letters other than A/C/G/T/N")
            out.append(seq)
    return out


def read_fasta_gz(path: Path) -> list[tuple[bytes, bytes]]:
    """(header line without '>', upper-cased sequence) pairs; multi-line records are joined."""
    records: list[tuple[bytes, bytes]] = []
    header, parts = None, []
    with gzip.open(path, "rb") as handle:
        for line_no, line in enumerate(handle, 1):
            line = line.strip()
            if line.startswith(b">"):
                if header is not None:
                    records.append((header, b"".join(parts).upper()))
                header, parts = line[1:], []
            elif line:
                if header is None:
                    sys.exit(f"{path}:{line_no}: sequence line before the first FASTA header")
                parts.append(line)
    if header is not None:
        records.append((header, b"".join(parts).upper()))
    return records


def kmer_hits(seq: bytes, table: dict, k: int) -> int:
    """OR of the masks of every k-mer of ``seq`` (both strands) found in ``table``; 0 when none."""
    mask = 0
    for strand in (seq, reverse_complement(seq)):
        for i in range(len(strand) - k + 1):
            m = table.get(strand[i : i + k])
            if m is not None:
                mask |= m
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, type=Path, help="input FASTA (.fa.gz)")
    parser.add_argument("--gue", required=True, type=Path, help="folder holding tf/0 ... mouse/4")
    parser.add_argument("--out", required=True, type=Path, help="filtered FASTA (.fa.gz)")
    parser.add_argument("--k", type=int, default=50, help="shared-substring length (default 50)")
    parser.add_argument("--criterion", choices=("shared-k", "whole"), default="shared-k")
    args = parser.parse_args()

    files = [(task, split) for task in TASKS for split in SPLITS]
    kmers: dict[bytes, int] = {}
    whole: dict[bytes, int] = {}
    lengths = set()
    for bit, (task, split) in enumerate(files):
        for seq in read_task(args.gue / task / f"{split}.csv"):
            if len(seq) <= args.k:
                sys.exit(
                    f"{task}/{split}.csv: a {len(seq)}-bp sequence is not longer than k={args.k}"
                )
            lengths.add(len(seq))
            whole[seq] = whole.get(seq, 0) | 1 << bit
            for i in range(len(seq) - args.k + 1):
                km = seq[i : i + args.k]
                kmers[km] = kmers.get(km, 0) | 1 << bit

    records = read_fasta_gz(args.corpus)
    kmer_mask, whole_mask = [], []
    found: set[bytes] = (
        set()
    )  # task sequences seen whole in the corpus (as stored in the task file)
    for _, seq in records:
        mask = kmer_hits(seq, kmers, args.k)
        wmask = 0
        if mask:  # a whole task sequence implies a shared k-mer
            for strand in (seq, reverse_complement(seq)):
                for n in lengths:
                    for i in range(len(strand) - n + 1):
                        m = whole.get(strand[i : i + n])
                        if m is not None:
                            wmask |= m
                            found.add(strand[i : i + n])
        kmer_mask.append(mask)
        whole_mask.append(wmask)

    drop = kmer_mask if args.criterion == "shared-k" else whole_mask
    kept = [rec for rec, m in zip(records, drop) if not m]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as out,
    ):
        for header, seq in kept:
            out.write(b">" + header + b"\n" + seq + b"\n")
    tmp.replace(args.out)

    def per_file(masks: list[int]) -> dict:
        return {
            f"{task}/{split}": sum(1 for m in masks if m >> bit & 1)
            for bit, (task, split) in enumerate(files)
        }

    dev_test = sum(1 << b for b, (_, s) in enumerate(files) if s != "train")
    report = {
        "corpus_sequences": len(records),
        "corpus_bases": sum(len(s) for _, s in records),
        "task_sequences_distinct": len(whole),
        "task_kmers_distinct": len(kmers),
        "k": args.k,
        "whole": {
            "corpus_sequences": sum(1 for m in whole_mask if m),
            "touching_dev_or_test": sum(1 for m in whole_mask if m & dev_test),
            "per_task_file": per_file(whole_mask),
            "distinct_task_sequences_contained": {
                f"{task}/{split}": sum(1 for t in found if whole[t] >> bit & 1)
                for bit, (task, split) in enumerate(files)
            },
        },
        "shared_k": {
            "corpus_sequences": sum(1 for m in kmer_mask if m),
            "touching_dev_or_test": sum(1 for m in kmer_mask if m & dev_test),
            "per_task_file": per_file(kmer_mask),
        },
        "criterion": args.criterion,
        "removed": len(records) - len(kept),
        "kept_sequences": len(kept),
        "kept_bases": sum(len(s) for _, s in kept),
        "removed_lengths": _length_histogram([s for (_, s), m in zip(records, drop) if m]),
    }
    print(json.dumps(report, indent=2))


def _length_histogram(seqs: list[bytes]) -> dict:
    counts: dict[int, int] = {}
    for s in seqs:
        counts[len(s)] = counts.get(len(s), 0) + 1
    return {str(n): counts[n] for n in sorted(counts)}


if __name__ == "__main__":
    main()
