#!/usr/bin/env python3
"""Re-make RESULTS.md: GUE transcription-factor tasks, test MCC as mean +- sd over seeds.

For each task it runs, with one fixed budget (at most --max-steps optimiser steps of batch 32):
  (a) the shipped pre-trained model + LoRA,
  (b) the shipped pre-trained model + full fine-tuning,
  (c) the same architecture from random initialisation, full training,
and writes a table next to the published DNABERT-2 numbers. Standard library only.

    python3 tools/make_results.py --gue PATH/TO/GUE [--seeds 1,2,3] [--max-steps 1000] [--threads 2] [--jobs 1]

`--configs` picks other columns, e.g. `--configs b,d --out RESULTS-strands.md` for (d), (b) on
both strands: reverse complements added to training, dev and test scored on both strands.

`--folds 5` measures the same configurations by k-fold cross-validation instead of GUE's fixed
split: each task's train, dev and test sequences are pooled into one file and `dnatune train
--folds K --split stratified` (or `--split similarity`) tests every sequence once (first seed only); the table shows the
fold mean +- sd, the pooled MCC and AUROC, and, with `--fixed-results RESULTS.md`, the same
configuration's seed mean on the fixed split next to them (`--out RESULTS-cv.md`).

`--train-positives 0.1` keeps that fraction of each task's training positives (a fixed random
subset; dev and test unchanged), the imbalance of peaks against background a lab's own data
often has; with `--configs b,e` it measures (e), (b) with the loss weighted by class (`balanced`).

On a small machine `--jobs 2 --threads 1` (two training processes of one thread each) gets more
done per hour than one process of two threads: the small model's kernels scale poorly across threads.

PATH/TO/GUE holds tf/0, tf/1, tf/2, mouse/0, mouse/2, mouse/4 (each train.csv, dev.csv, test.csv),
as in the GUE release. Finished runs are reused, so an interrupted invocation picks up where it
stopped. The exact commands are written into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["tf/0", "tf/1", "tf/2", "mouse/0", "mouse/2", "mouse/4"]
# Test MCC x 100 of DNABERT-2-117M after fine-tuning (Zhou et al., ICLR 2024; data/README.md).
PUBLISHED_DNABERT2 = {"tf/0": 71.99, "tf/1": 76.06, "tf/2": 66.52, "mouse/0": 56.76, "mouse/2": 79.32, "mouse/4": 52.66}
# Fine-tuning settings every configuration shares. Mean pooling and no hidden dropout: with the
# [CLS] token and dropout 0.1 the shipped model hardly learned GUE mouse/0 in 300 steps (LoRA test
# MCC 0.09 +- 0.08; full fine-tuning at chance for a whole run on one seed of three), although a
# linear probe on its frozen mean-pooled features reaches dev MCC 0.30; with mean pooling and no
# dropout the same runs reach test MCC 0.30-0.31 (LoRA seed 1, full seed 2).
SHARED_ARGS = ["--pooling", "mean", "--dropout", "0"]
CONFIGS = {
    "a": ("shipped + LoRA", "pretrained", ["--method", "lora", "--lr", "1e-3"]),
    "b": ("shipped + full", "pretrained", ["--method", "full", "--lr", "1e-4"]),
    "c": ("random init + full", "scratch", ["--method", "full", "--lr", "5e-4"]),
    "d": (
        "shipped + full, both strands",
        "pretrained",
        ["--method", "full", "--lr", "1e-4", "--reverse-complement", "--average-strands"],
    ),
    "e": (
        "shipped + full, class-weighted loss",
        "pretrained",
        ["--method", "full", "--lr", "1e-4", "--class-weights", "balanced"],
    ),
}
DEFAULT_CONFIGS = "a,b,c"


def run(cmd: list[str], log: Path) -> None:
    print("$", shlex.join(cmd), flush=True)
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def with_fewer_positives(gue: Path, task: str, fraction: float, out: Path) -> Path:
    """A copy of `task` whose train.csv keeps `fraction` of its positives (seeded, so re-runs agree)."""
    target = out / task
    if (target / "test.csv").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    lines = (gue / task / "train.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    rng = random.Random(0)
    kept = [r for r in rows if r.rsplit(",", 1)[1] != "1" or rng.random() < fraction]
    (target / "train.csv").write_text("\n".join([header, *kept]) + "\n")
    for split in ("dev.csv", "test.csv"):
        shutil.copyfile(gue / task / split, target / split)
    return target


SPLITS = {
    "stratified": "stratified folds",
    "similarity": "folds that keep sequences sharing a 31-mer (either strand) together",
}


def pooled_task(gue: Path, task: str, out: Path) -> Path:
    """One CSV with the task's train, dev and test rows in that order, under one header."""
    target = out / task / "all.csv"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for split in ("train.csv", "dev.csv", "test.csv"):
        rows = (gue / task / split).read_text().splitlines()
        lines += rows if not lines else rows[1:]
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(target)
    return target


def fixed_split_cell(results: Path, task: str, key: str) -> str:
    """The cell of configuration `key` for `task` in a RESULTS.md table a fixed-split invocation wrote."""
    rows = [line.split("|")[1:-1] for line in results.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    column = next((i for i, name in enumerate(header) if name.startswith(f"({key})")), None)
    row = next((r for r in rows if r[0].strip() == task), None)
    return row[column].strip() if column is not None and row else "not run"


def multiclass_mcc(pairs: list[tuple[int, int]]) -> float:
    """MCC of (label, call) pairs, Gorodkin's K-class form (the binary MCC for two classes)."""
    classes = sorted({c for pair in pairs for c in pair})
    n = len(pairs)
    correct = sum(1 for y, c in pairs if y == c)
    true_counts = [sum(1 for y, _ in pairs if y == k) for k in classes]
    call_counts = [sum(1 for _, c in pairs if c == k) for k in classes]
    cross = sum(t * c for t, c in zip(true_counts, call_counts))
    denominator = ((n * n - sum(c * c for c in call_counts)) * (n * n - sum(t * t for t in true_counts))) ** 0.5
    return (correct * n - cross) / denominator if denominator else 0.0


def mcc_by_origin(gue: Path, task: str, predictions: Path, resamples: int = 1000) -> dict[str, tuple]:
    """Pooled cross-validation MCC over the rows that came from each of GUE's train, dev and test
    files, with a bootstrap sd (seeded resampling of those rows): is GUE's fixed test set as hard
    as the rest of the task's sequences, for models that did not see it?"""
    sizes = [len((gue / task / f"{split}.csv").read_text().splitlines()) - 1 for split in ("train", "dev", "test")]
    by_origin: dict[str, list[tuple[int, int]]] = {"train": [], "dev": [], "test": []}
    for row in predictions.read_text().splitlines()[1:]:
        fields = row.split(",")
        index = int(fields[1].rsplit(":", 1)[1]) - 2  # the id's line number in all.csv, after its header
        origin = "train" if index < sizes[0] else "dev" if index < sizes[0] + sizes[1] else "test"
        by_origin[origin].append((int(fields[3]), int(fields[4])))
    return {origin: mcc_with_sd(pairs, resamples) for origin, pairs in by_origin.items()}


def mcc_with_sd(pairs: list[tuple[int, int]], resamples: int = 1000) -> tuple[int, float, float]:
    """(n, MCC, bootstrap sd) of (label, call) pairs, the resampling seeded."""
    rng = random.Random(0)
    draws = [multiclass_mcc(rng.choices(pairs, k=len(pairs))) for _ in range(resamples)]
    mean = sum(draws) / resamples
    sd = (sum((d - mean) ** 2 for d in draws) / (resamples - 1)) ** 0.5
    return len(pairs), multiclass_mcc(pairs), sd


COMPLEMENT = str.maketrans("ACGT", "TGCA")


def mask_tandem_repeats(seq: str) -> str:
    """`seq` with N over every stretch of at least 12 bases and 3 units that repeats itself with a
    period of 1 to 6, as dnatune masks microsatellites before linking sequences."""
    masked = list(seq)
    n = len(seq)
    for period in range(1, 7):
        start = 0
        for j in range(n - period + 1):
            repeats = j + period < n and seq[j] == seq[j + period] and seq[j] != "N"
            if not repeats:
                if j > start and j + period - start >= max(12, 3 * period):
                    masked[start:j + period] = "N" * (j + period - start)
                start = j + 1
    return "".join(masked)


def canonical_kmers(seq: str, k: int = 31) -> set[str]:
    """The k-mers of `seq` that dnatune's similarity split links by: without N once tandem repeats
    are masked, each as the alphabetically smaller of it and its reverse complement."""
    seq = mask_tandem_repeats(seq)
    rc = seq.translate(COMPLEMENT)[::-1]
    n = len(seq)
    windows = (min(seq[i:i + k], rc[n - i - k:n - i]) for i in range(n - k + 1))
    return {w for w in windows if "N" not in w}


def rows_by_overlap(run: Path, k: int = 31) -> dict[str, list[tuple[int, int]]]:
    """The (label, call) pairs of a cross-validation's held-out rows that share a k-mer (either
    strand) with their fold's training set, and of the others: how do copies across the split score?"""
    by_fold: dict[str, list[list[str]]] = {}
    for row in (run / "cv_predictions.csv").read_text().splitlines()[1:]:
        fields = row.split(",")
        by_fold.setdefault(fields[0], []).append(fields)
    groups: dict[str, list[tuple[int, int]]] = {"shared": [], "not shared": []}
    for fold, rows in by_fold.items():
        train: set[str] = set()
        for line in (run / f"fold-{fold}" / "split.csv").read_text().splitlines()[1:]:
            _, seq, _, split = line.split(",")
            if split == "train":
                train |= canonical_kmers(seq, k)
        sequences = {}
        for line in (run / f"fold-{fold}" / "split.csv").read_text().splitlines()[1:]:
            ident, seq, _, split = line.split(",")
            if split == "test":
                sequences[ident] = seq
        for fields in rows:
            shared = not canonical_kmers(sequences[fields[1]], k).isdisjoint(train)
            groups["shared" if shared else "not shared"].append((int(fields[3]), int(fields[4])))
    return groups


def overlap_cell(pairs: list[tuple[int, int]]) -> str:
    """MCC, size, class balance and accuracy of a group of rows: MCC alone misleads when a group's
    classes are far from the whole set's balance."""
    if not pairs:
        return "none"
    n, mcc, sd = mcc_with_sd(pairs)
    positive = sum(1 for label, _ in pairs if label == 1) / max(n, 1)
    accuracy = sum(1 for label, call in pairs if label == call) / max(n, 1)
    score = f"{100 * mcc:.2f} +- {100 * sd:.2f}" if 0 < positive < 1 else "one class, no MCC"
    return f"{score} (n {n}, {100 * positive:.1f} % positive, accuracy {100 * accuracy:.1f})"


def mcc_cell(stat: dict) -> str:
    return f"{100 * stat['mean']:.2f} +- {100 * stat['sd']:.2f}"


def cross_validation_table(args, configs: dict, tasks: list[str], eval_every: int, provenance: str) -> list[str]:
    """RESULTS-cv.md: per task and configuration, the fold mean +- sd, pooled MCC and AUROC, the
    fixed GUE split's seed mean from a RESULTS.md table, and the pooled MCC per GUE file."""
    seed = args.seeds.split(",")[0]
    lines = [
        f"# Results: GUE transcription-factor tasks, {args.folds}-fold cross-validation",
        "",
        f"Each task's train, dev and test sequences pooled into one file and split into {args.folds} {SPLITS[args.split]} "
        f"(seed {seed}); each fold is the test set of one run trained on the other folds, with 10 % of "
        f"them held out as dev to pick the checkpoint. Every sequence is tested once, by the model that did not "
        f"see it. Test MCC x 100: mean +- sd over folds, and pooled (all held-out predictions together, "
        f"`cv_predictions.csv`). Budget {args.max_steps} optimiser steps of batch 32, dev evaluation every "
        f"{eval_every} steps, the other settings as RESULTS.md. {args.jobs} training process(es) of "
        f"{args.threads} CPU thread(s) at a time. Made by `tools/make_results.py --folds {args.folds} --split {args.split}` ({provenance}).",
        "",
        "Three columns split the pooled predictions by the GUE file each sequence came from, "
        "+- a bootstrap sd (1,000 resamples of those rows): whether GUE's fixed test set is as hard as the "
        "rest of the task for models that did not train on it. The last two split them by whether the "
        "sequence shares a 31-mer (either strand) with its fold's training sequences (copies and repeats "
        "across the split), with each group's share of positives and accuracy, since a group's MCC "
        "depends on its class balance.",
        "",
    ]
    header = "| task | sequences | configuration | "
    if args.fixed_results:
        header += f"GUE fixed split ({args.fixed_results.name}) | "
    header += (
        f"{args.folds}-fold CV, mean +- sd | pooled MCC | pooled AUROC | pooled MCC on GUE's train rows | "
        "on dev rows | on test rows | on rows sharing a 31-mer with training | on the others |"
    )
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for task in tasks:
        for key, (name, _, _) in configs.items():
            summary = json.loads((args.runs / task.replace("/", "-") / key / "folds_summary.json").read_text())
            cv = next(s for s in summary["test"] if s["metric"] == "mcc")
            pooled = summary["pooled"]
            cells = [task, str(pooled["n"]), f"({key}) {name}"]
            if args.fixed_results:
                cells.append(fixed_split_cell(args.fixed_results, task, key))
            cells += [mcc_cell(cv), f"{100 * pooled['mcc']:.2f}", f"{pooled['auroc']:.3f}"]
            run = args.runs / task.replace("/", "-") / key
            origins = mcc_by_origin(args.gue, task, run / "cv_predictions.csv")
            cells += [f"{100 * mcc:.2f} +- {100 * sd:.2f} (n {n})" for n, mcc, sd in origins.values()]
            cells += [overlap_cell(pairs) for pairs in rows_by_overlap(run).values()]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def prior_shifted_mcc(predictions: Path, positive_fraction: float) -> float:
    """MCC of a binary test_predictions.csv with positives weighted so that they make up
    `positive_fraction` of the set: the expected MCC on a test set with that imbalance."""
    rows = [line.split(",") for line in predictions.read_text().splitlines()[1:]]
    labels = [int(r[2]) for r in rows]
    calls = [int(r[3]) for r in rows]
    positives = sum(labels)
    negatives = len(labels) - positives
    weight = positive_fraction / (1 - positive_fraction) * negatives / positives
    tp = weight * sum(1 for y, c in zip(labels, calls) if y == 1 and c == 1)
    fn = weight * sum(1 for y, c in zip(labels, calls) if y == 1 and c == 0)
    fp = sum(1 for y, c in zip(labels, calls) if y == 0 and c == 1)
    tn = sum(1 for y, c in zip(labels, calls) if y == 0 and c == 0)
    denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gue", required=True, type=Path)
    p.add_argument("--model", type=Path, default=ROOT / "models/dnatune-dnabert2-small")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="threads per training process")
    p.add_argument("--jobs", type=int, default=1, help="training processes run at once")
    p.add_argument("--evals", type=int, default=5, help="dev evaluations per run (best one is tested)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs/results")
    p.add_argument("--binary", type=Path, default=ROOT / "target/release/dnatune")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"columns, of {','.join(CONFIGS)}")
    p.add_argument("--out", type=Path, default=ROOT / "RESULTS.md")
    p.add_argument("--train-positives", type=float, default=1.0, help="fraction of training positives kept")
    p.add_argument("--folds", type=int, default=0, help="k-fold cross-validation of the pooled task instead")
    p.add_argument("--split", choices=sorted(SPLITS), default="stratified", help="how --folds partitions a task")
    p.add_argument("--fixed-results", type=Path, help="a fixed-split RESULTS.md whose figures are shown beside the folds")
    args = p.parse_args()
    if args.folds and args.train_positives < 1.0:
        p.error("--folds pools each task's sequences as they are; it does not take --train-positives")
    configs = {k: CONFIGS[k] for k in args.configs.split(",")}
    binary = str(args.binary)
    if not args.binary.exists():
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    scratch = args.runs / "scratch-model"
    if not (scratch / "config.json").exists():
        run([binary, "init-model", "--like", str(args.model), "--out", str(scratch)], args.runs / "init.log")
    models = {"pretrained": args.model, "scratch": scratch}
    tasks = args.tasks.split(",")
    eval_every = max(args.max_steps // max(args.evals, 1), 1)
    results: dict[str, dict[str, dict]] = {}
    commands = []
    pending = []
    for task in tasks:
        data = args.gue / task
        if args.train_positives < 1.0:
            data = with_fewer_positives(args.gue, task, args.train_positives, args.runs / "data")
        if args.folds:
            data = pooled_task(args.gue, task, args.runs / "data")
            repeat = ["--folds", str(args.folds), "--split", args.split, "--seed", args.seeds.split(",")[0]]
            done = "folds_summary.json"
        else:
            repeat = ["--seeds", args.seeds]
            done = "seeds_summary.json"
        for key, (_, model, extra) in configs.items():
            out = args.runs / task.replace("/", "-") / key
            cmd = [
                binary, "--threads", str(args.threads), "train",
                "--model", str(models[model]), "--data", str(data), "--out", str(out),
                *repeat, "--max-steps", str(args.max_steps), "--epochs", "1000",
                "--batch-size", "32", "--eval-every", str(eval_every), "--patience", "0",
                *SHARED_ARGS, *extra,
            ]
            commands.append(cmd)
            if not (out / done).exists():
                out.mkdir(parents=True, exist_ok=True)
                pending.append((cmd, out / "train.log"))
    started = time.time()
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        list(pool.map(lambda job: run(*job), pending))
    hours = (time.time() - started) / 3600
    sweep, unit = ("cross-validation", "fold") if args.folds else ("seed sweep", "seed")
    if pending:
        provenance = (
            f"this invocation ran or resumed {len(pending)} of the {len(commands)} {sweep}s in {hours:.1f} h "
            f"and reused the rest; a {sweep} also reuses every {unit} an earlier invocation finished"
        )
    else:
        provenance = f"all {len(commands)} {sweep}s were run by earlier invocations and reused here"
    if args.folds:
        lines = cross_validation_table(args, configs, tasks, eval_every, provenance)
        lines += ["", "## Commands", "", "```sh", *[shlex.join(c) for c in commands], "```", ""]
        args.out.write_text("\n".join(lines))
        print("\n".join(lines))
        return 0
    for task in tasks:
        for key in configs:
            summary = args.runs / task.replace("/", "-") / key / "seeds_summary.json"
            stats = json.loads(summary.read_text())["test"]
            results.setdefault(task, {})[key] = next(s for s in stats if s["metric"] == "mcc")
    title = "# Results: GUE transcription-factor tasks"
    if args.configs != DEFAULT_CONFIGS:
        title += ", configurations " + ", ".join(f"({k})" for k in configs)
    if args.train_positives < 1.0:
        title += f", {100 * args.train_positives:g} % of the training positives"
    lines = [
        title,
        "",
        f"Test MCC x 100, mean +- sd over seeds {args.seeds}; budget {args.max_steps} optimiser steps of batch 32 "
        f"(sequences truncated to 128 tokens), evaluation on dev every {eval_every} steps, best dev "
        f"checkpoint tested; every configuration pools the mean over tokens and trains without hidden dropout "
        f"(see `SHARED_ARGS` in the script for why). {args.jobs} training process(es) of {args.threads} CPU thread(s) at a time. "
        f"Made by `tools/make_results.py` ({provenance}).",
        "",
        "| task | DNABERT-2-117M (published) | " + " | ".join(f"({k}) {v[0]}" for k, v in configs.items()) + " |",
        "| --- | --- | " + " | ".join("---" for _ in configs) + " |",
    ]
    for task in tasks:
        cells = [f"{100 * r['mean']:.2f} +- {100 * r['sd']:.2f}" for r in (results[task][k] for k in configs)]
        lines.append(f"| {task} | {PUBLISHED_DNABERT2[task]:.2f} | " + " | ".join(cells) + " |")
    human = [t for t in tasks if t.startswith("tf/")]
    if human:
        avg = {k: sum(results[t][k]["mean"] for t in human) / len(human) for k in configs}
        pub = sum(PUBLISHED_DNABERT2[t] for t in human) / len(human)
        lines.append(
            f"| human TF average | {pub:.2f} | " + " | ".join(f"{100 * avg[k]:.2f}" for k in configs) + " |"
        )
    if {"a", "b", "c"} <= configs.keys():
        # The bar of issue 5: pre-training must beat random initialisation on every task.
        pretrained_best = {t: max(results[t]["a"]["mean"], results[t]["b"]["mean"]) for t in tasks}
        beaten = [t for t in tasks if pretrained_best[t] > results[t]["c"]["mean"]]
        missed = [t for t in tasks if t not in beaten]
        lines += [
            "",
            f"Pre-trained (better of (a) and (b)) above random initialisation (c) on {len(beaten)} of {len(tasks)} "
            f"tasks" + (f"; not on {', '.join(missed)}." if missed else "."),
        ]
    if args.train_positives < 1.0:
        # With imbalanced training data the threshold-0.5 metrics and the ranking ones can part ways.
        shown = ["precision", "recall", "auroc", "auprc"]
        lines += [
            "",
            "Other test metrics x 100, mean over seeds. The test set is balanced as GUE's; the last column "
            "is the MCC the same calls would get on a test set with the training set's imbalance (each test "
            "positive counted with the weight that gives the training split's positive fraction):",
            "",
        ]
        lines.append("| task | configuration | " + " | ".join(shown) + " | MCC at the training imbalance |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in shown) + " | --- |")
        for task in tasks:
            train_rows = (args.runs / "data" / task / "train.csv").read_text().splitlines()[1:]
            fraction = sum(r.rsplit(",", 1)[1] == "1" for r in train_rows) / len(train_rows)
            for key in configs:
                sweep = args.runs / task.replace("/", "-") / key
                seeds = args.seeds.split(",")
                per_seed = [json.loads((sweep / f"seed-{seed}" / "metrics.json").read_text())["test"] for seed in seeds]
                cells = [f"{100 * sum(m[name] for m in per_seed) / len(per_seed):.2f}" for name in shown]
                shifted = [prior_shifted_mcc(sweep / f"seed-{seed}" / "test_predictions.csv", fraction) for seed in seeds]
                cells.append(f"{100 * sum(shifted) / len(shifted):.2f}")
                lines.append(f"| {task} | ({key}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "DNABERT (6-mer) reaches a human-TF average of 64.2 in the DNABERT-2 paper.",
        "",
        "## Commands",
        "",
        "```sh",
        *[shlex.join(c) for c in commands],
        "```",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
